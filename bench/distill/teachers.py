"""The two kinds of distillation teacher, behind one interface (model, tokenizer, streams,
task, batch, seq, mechanism; attention_names, with_positions, layer_config, check_student,
student, logits, sequence_logits, attention_flops): a run folder of `attnbench train` (RunTeacher) and a
transformers causal or masked LM by local path or HF cache (HFTeacher; fetched from the Hub only
when the user passes --download: hf_offline() keeps transformers and huggingface_hub off the network)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
from torch import nn

from attnbench import checkpoint, store
from attnbench.errors import InputError
from attnbench.flops import attention_flops
from attnbench.models import registry
from attnbench.train import data
from attnbench.train.data import IGNORE
from attnbench.train.spec import TrainSpec


def hf_offline() -> None:
    """Keep transformers and huggingface_hub off the network (the tool's promise: no network unless
    asked): even with local_files_only, huggingface_hub looks huggingface.co up for its user agent.
    Both read HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE when huggingface_hub is imported; where it already
    is (a library caller, the test suite), its module constant is what they consult, so it is set too."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def pooled_kv(fused: torch.Tensor, teacher, student) -> torch.Tensor:
    """A fused q/k/v projection's weight [(Hq + 2 H) D, C] (or bias [(Hq + 2 H) D]) of ``teacher``'s
    H kv heads as ``student``'s Hkv: q rows kept, each group of H / Hkv key (and value) heads
    mean-pooled into one (GQA uptraining, Ainslie et al. 2023). Shapes that do not pool are returned as given."""
    heads, d = teacher.heads, teacher.dim // teacher.heads
    h, hkv = teacher.kv_heads or heads, student.kv_heads or heads
    if h % hkv or fused.shape[0] != (heads + 2 * h) * d:
        return fused
    q, k, v = fused.split([heads * d, h * d, h * d])

    def pool(part: torch.Tensor) -> torch.Tensor:
        grouped = part.reshape(hkv, h // hkv, d, *part.shape[1:])
        return grouped.mean(1).reshape(hkv * d, *part.shape[1:])

    return torch.cat([q, pool(k), pool(v)])


class RunTeacher:
    """A model trained by `attnbench train` (LanguageModel), its tokenizer and token streams."""

    def __init__(self, model, tokenizer, streams: dict[str, torch.Tensor], *, batch: int, seq: int, label: str, options=None,
                 overrides=None):
        from attnbench.models.transformer import LanguageModel

        if not isinstance(model, LanguageModel):
            raise InputError(f"{label} does not hold an attnbench LanguageModel")
        self.model, self.tokenizer, self.streams = model, tokenizer, streams
        self.task = "clm" if model.cfg.causal else "mlm"
        self.batch, self.seq, self.label = batch, seq, label
        self.options = options or {}  # the students' mechanism options (DistillSpec.options)
        self.overrides = overrides or {}  # ModelConfig fields the students change (positions, kv_heads)
        self.mechanism = model.cfg.mechanism
        self.max_length = model.cfg.max_length

    @classmethod
    def from_run(
        cls, run_dir: Path, *, mechanism: str | None, batch: int | None, seq: int | None, device: str, options=None,
        download: bool = False, overrides=None, corpus_name: str | None = None,
    ) -> "RunTeacher":
        """The last checkpoint of ``mechanism`` (default: the run's first) in a run folder of `attnbench train`,
        with the run's own tokenizer (checked against the hash it recorded, so it is rebuilt from the
        run's corpus) and the token streams of ``corpus_name`` (train's --data names; None: the run's corpus).
        A corpus is fetched only with ``download`` (distill's own flag, not the one the train run recorded)."""
        from attnbench.models.presets import Preset
        from attnbench.models.transformer import LanguageModel, ModelConfig

        meta = store.read_meta(run_dir)
        if meta.get("kind") != "train" or "models" not in meta:
            raise InputError(f"--teacher {run_dir}: not a run folder of `attnbench train`")
        spec = TrainSpec(**meta["spec"])
        mechanism = mechanism or next(iter(meta["models"]))  # a model's name in the run: attn, or attn+scheme
        if mechanism not in meta["models"]:
            raise InputError(f"--teacher-attn {mechanism}: {run_dir} trained {', '.join(meta['models'])}")
        step_dir = checkpoint.latest(run_dir / "checkpoints" / mechanism)
        if step_dir is None:
            raise InputError(f"{run_dir} has no checkpoint of {mechanism} yet")
        cfg = ModelConfig(**meta["models"][mechanism]["config"])
        model = LanguageModel(cfg, spec.seed).to(device)
        checkpoint.load(step_dir, model)
        corpus = data.load_corpus(spec.data, download)
        tokenizer = data.load_tokenizer(spec.tokenizer, corpus, Preset.from_name(spec.preset).vocab)
        if tokenizer.digest != meta["tokenizer"]["sha256"]:
            raise InputError(f"the tokenizer {tokenizer.name} found here is not the one {run_dir} trained with")
        distilled_on = corpus if corpus_name is None else data.load_corpus(corpus_name, download)
        streams = data.token_streams(distilled_on, tokenizer)
        return cls(model, tokenizer, streams, batch=batch or spec.batch, seq=seq or spec.seq, label=f"{run_dir}:{mechanism}",
                   options=options, overrides=overrides)

    def attention_names(self, model: nn.Module) -> list[str]:
        return [f"trunk.blocks.{i}.attention" for i in range(len(model.trunk.blocks))]

    def with_positions(self, scheme: str | None) -> "RunTeacher":
        """This teacher, its students given position scheme ``scheme`` (None: as they are)."""
        if scheme is None:
            return self
        other = copy.copy(self)
        other.overrides = {**self.overrides, "positions": scheme}
        return other

    def model_config(self, mechanism: str, impl: str):
        """The teacher's ModelConfig with ``mechanism`` (the run's options it declares, the students'
        position scheme and kv heads); InputError when the mechanism cannot take them."""
        from dataclasses import replace

        scheme = self.overrides.get("positions")
        window, options = registry.get(mechanism).split_options(self.options, scheme)
        try:
            return replace(self.model.cfg, mechanism=mechanism, impl=impl, window=window, attention=options, **self.overrides)
        except ValueError as err:  # a scheme the mechanism refuses, kv heads that do not divide the heads
            raise InputError(f"--student {mechanism}: {err}") from None

    def layer_config(self, mechanism: str) -> registry.LayerConfig:
        return self.model_config(mechanism, self.model.cfg.impl).layer_config()

    def check_student(self, mechanism: str, impl: str) -> None:
        """Nothing beyond the impl choice: every registry mechanism has a layer for our models."""

    def student(self, mechanism: str, impl: str) -> nn.Module:
        """The teacher's model with ``mechanism`` in every block, teacher tensors copied where name and shape agree."""
        from attnbench.models.transformer import LanguageModel

        cfg = self.model_config(mechanism, impl)
        student = LanguageModel(cfg, seed=0).to(next(self.model.parameters()).device)
        theirs = self.model.state_dict()
        if cfg.kv_heads != self.model.cfg.kv_heads:  # fewer kv heads: the teacher's, mean-pooled per group
            theirs = {k: pooled_kv(v, self.model.cfg, cfg) if k.endswith(("attention.qkv.weight", "attention.qkv.bias")) else v
                      for k, v in theirs.items()}
        mine = student.state_dict()
        shared = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
        student.load_state_dict(shared, strict=False)
        return student

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [N, V] at the N labelled positions of ``batch`` (the head never sees the others)."""
        hidden = model.trunk(batch["input_ids"], batch.get("seq_lens"))
        return model.head(hidden[batch["labels"] != IGNORE])

    def sequence_logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, t] -> logits [t, V]: row i predicts the token after ids[0, i]."""
        return model(ids)[0]

    def attention_flops(self, mechanism: str, batch: int, seq: int) -> float:
        return attention_flops(registry.get(mechanism), self.layer_config(mechanism), self.model.cfg.layers, batch, seq)


class HFTeacher:
    """A transformers causal or masked LM from a local path or the HF cache (from the Hub only with
    ``download``); students run our cores through AttentionInterface (models/hf_attention.py)."""

    def __init__(self, path: str, *, batch: int, seq: int, device: str, download: bool = False, corpus_name: str = "stdlib"):
        import transformers

        local = not download
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=local)
            masked = any(name.endswith("ForMaskedLM") for name in (config.architectures or []))
            auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
            self.model = auto.from_pretrained(path, local_files_only=local).to(device)
            tokenizer_file = transformers.utils.cached_file(path, "tokenizer.json", local_files_only=local)
        except (OSError, ValueError) as err:
            detail = str(err).splitlines()[0]
            if local and isinstance(err, OSError):  # missing files; transformers' text says it "couldn't connect", which it never tried
                detail = "pass --download to fetch it from the Hugging Face Hub"
            raise InputError(f"--teacher {path}: not a run folder, nor a transformers model on disk or in the HF cache ({detail})") from None
        self.task = "mlm" if masked else "clm"
        self.tokenizer = data.load_tokenizer(tokenizer_file, None, 0)
        self.streams = data.token_streams(data.load_corpus(corpus_name, download), self.tokenizer)
        self.batch, self.seq, self.label = batch, seq, path
        self.mechanism = "standard"  # HF's eager/sdpa attention is exact softmax attention
        self.max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        text = config.get_text_config()
        heads = text.num_attention_heads
        self._layers = text.num_hidden_layers
        self._shape = dict(
            dim=text.hidden_size, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, causal=self.task == "clm",
        )

    def attention_names(self, model: nn.Module) -> list[str]:
        from attnbench.models.hf_attention import CORE_ATTRIBUTE

        suffix = "." + CORE_ATTRIBUTE
        return [name.removesuffix(suffix) for name, _ in model.named_modules() if name.endswith(suffix)]

    def layer_config(self, mechanism: str) -> registry.LayerConfig:
        return registry.LayerConfig(**self._shape)

    def check_student(self, mechanism: str, impl: str) -> None:
        """Inside a transformers model a student runs a kernel-level core (UnknownNameError names the
        mechanisms that have one); registering it now, before any run folder, is what checks that."""
        from attnbench.models import hf_attention

        hf_attention.register(mechanism, impl)

    def student(self, mechanism: str, impl: str) -> nn.Module:
        from attnbench.models import hf_attention

        student = copy.deepcopy(self.model)
        student.set_attn_implementation(hf_attention.register(mechanism, impl))
        with torch.no_grad():  # the cores are created by the first forward
            student(input_ids=torch.zeros(1, 2, dtype=torch.long, device=next(student.parameters()).device))
        return student

    def with_positions(self, scheme: str | None) -> "HFTeacher":
        if scheme is not None:
            raise InputError("--positions reaches the students of an `attnbench train` teacher only")
        return self

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, seq_lens = batch["input_ids"], batch.get("seq_lens")
        mask = None if seq_lens is None else (torch.arange(ids.shape[1], device=ids.device)[None, :] < seq_lens[:, None]).long()
        return model(input_ids=ids, attention_mask=mask).logits[batch["labels"] != IGNORE]

    def sequence_logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits[0]

    def attention_flops(self, mechanism: str, batch: int, seq: int) -> float:
        return attention_flops(registry.get(mechanism), self.layer_config(mechanism), self._layers, batch, seq)
