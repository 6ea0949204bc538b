"""The columns of a distillation run's CSV files (results/README.md describes each one).

    distill.csv   DISTILL_COLUMNS: per student, a train row and a held-out row every evaluation (step 0: zero-shot)
    summary.csv   SUMMARY_COLUMNS: per model (the teacher, then each student) cost and quality at the end
    scale.csv     SCALE_COLUMNS: one attention layer of each model timed at longer lengths (--scale-seq)
    density.csv   DENSITY_COLUMNS: the fraction of causal key blocks a learned mask keeps, per layer and head
"""

from attnbench import store

DISTILL_CSV = store.DISTILL_CSV
SUMMARY_CSV, SCALE_CSV, DENSITY_CSV = "summary.csv", "scale.csv", "density.csv"
DISTILL_COLUMNS = [
    "student", "step", "split", "loss", "kl", "agreement", "ppl_student", "ppl_teacher",
    "layer_mse", "lr", "tokens_per_s", "elapsed_s", "status", "message",
]
GENERATION_METRICS = ["distinct_1", "distinct_2", "rep_4", "fluency_ppl"]  # bench/distill/generate.py
EDGE_METRICS = ["kl_one_token", "agreement_one_token", "kl_repeated", "agreement_repeated"]  # bench/distill/edges.py
SUMMARY_COLUMNS = [
    "model", "student", "mechanism", "positions", "mask_l1", "impl", "steps", "kl_zero_shot", "kl", "agreement", "ppl",
    "density", "attn_flops", "forward_ms", "peak_mem_mib", "trainable_params", *GENERATION_METRICS, *EDGE_METRICS,
    "status", "message",
]
SCALE_COLUMNS = ["model", "mechanism", "impl", "seq", "batch", "input", "forward_ms", "peak_mem_mib", "density", "status", "message"]
DENSITY_COLUMNS = ["student", "layer", "head", "density"]
ADDED_SCALE_COLUMNS = ("input",)  # scale.csv before it: the input was N(0, 1) noise
# summary.csv columns runs of an earlier schema lack (store.read_rows reads them as empty)
ADDED_SUMMARY_COLUMNS = ("student", "positions", "mask_l1", "density", *GENERATION_METRICS, *EDGE_METRICS, "status", "message")
