"""The columns of a training run's CSV files (results/README.md describes each one).

    train.csv           TRAIN_COLUMNS: one train row per step, one valid row per evaluation
    entropy.csv         ENTROPY_COLUMNS: attention entropy per layer at every evaluation
    extrapolation.csv   EXTRAPOLATION_COLUMNS: loss at L, 2L, 4L
    inference.csv       INFERENCE_COLUMNS: the trained model's forward in eval mode, tokens/s at L and 4L
"""

TRAIN_COLUMNS = [
    "attn", "positions", "step", "split", "loss", "ppl", "accuracy", "lr", "tokens", "tokens_per_s",
    "grad_norm", "peak_mem_mib", "elapsed_s", "status", "message",
]
ENTROPY_COLUMNS = ["attn", "positions", "step", "layer", "entropy", "status", "message"]
EXTRAPOLATION_COLUMNS = ["attn", "positions", "train_seq", "seq", "factor", "method", "loss", "ppl", "tokens", "status", "message"]
INFERENCE_COLUMNS = ["attn", "positions", "seq", "batch", "ms", "tokens_per_s", "status", "message"]
ENTROPY_CSV, EXTRAPOLATION_CSV, INFERENCE_CSV = "entropy.csv", "extrapolation.csv", "inference.csv"
# columns runs of an earlier schema lack (store.read_rows reads them as empty): positions, the
# scheme each model was trained with (its mechanism's natural one before it was an axis)
ADDED_COLUMNS = ("positions",)
