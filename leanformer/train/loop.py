"""The training loop: reads top to bottom like nanoGPT's, with checkpoints that resume exactly.

One :class:`Trainer` per run. Data parallelism (DDP / FSDP2 under torchrun) enters only through
:mod:`leanformer.train.distributed`, which wraps the model and tells the sampler its rank.
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from leanformer.config import CUDA_GRAPH_MODES, ConfigError, RunConfig
from leanformer.device import resolve_device
from leanformer.model import TransformerLM
from leanformer.train import distributed as dist_utils
from leanformer.train import metrics as metrics_file
from leanformer.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    read_weights,
    save_checkpoint,
)
from leanformer.train.lock import OutputLock
from leanformer.train.mfu import peak_flops_for
from leanformer.train.mlm import MaskingRule, masked_eval_batches, masking_rule, mlm_metrics, seeded_generator
from leanformer.train.optim import build_optimizer, lr_at, param_tags, set_lr
from leanformer.train.signals import SaveTimer, StopRequest, TrainingInterrupted, agree


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """``train.compile``: ``auto`` compiles on CUDA (where it pays) and runs eagerly on CPU."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def cuda_graph_refusal(tc, device: torch.device, world_size: int) -> str | None:
    """Why the trainer cannot run ``train.compile_mode`` (a :data:`CUDA_GRAPH_MODES` mode, compiled on CUDA), or
    None. A replay reuses the memory of the last replay's outputs, the parameters' gradients among them (they
    become ``.grad``; ``zero_grad(set_to_none=True)`` drops them before the next step's replay), so gradient
    accumulation would add into overwritten memory (torch's cudagraph_trees names this case; pytorch/pytorch
    #169545); several processes are not tested here."""
    if tc.compile_mode not in CUDA_GRAPH_MODES or not compile_enabled(tc.compile, device) or device.type != "cuda":
        return None
    if tc.grad_accum > 1:
        return (f"train.compile_mode={tc.compile_mode} replays CUDA graphs, whose outputs the next replay "
                f"overwrites, so train.grad_accum={tc.grad_accum} cannot add micro-batches' gradients under it: "
                "set train.grad_accum=1 or train.compile_mode=default")
    if world_size > 1:
        return (f"train.compile_mode={tc.compile_mode} (CUDA graphs) runs in one process here, not {world_size}: "
                "use train.compile_mode=default under torchrun")
    return None


def enable_fast_matmul(device: torch.device) -> None:
    """TF32 for float32 matrix products and convolutions on CUDA (bf16 autocast is unaffected)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains ``model`` on ``data`` as ``run_cfg`` says, writing metrics and checkpoints to ``out_dir``.

    ``teacher`` (optional) adds ``distill_weight · KL(teacher ‖ student)`` on the logits.
    ``on_log`` is called with every metrics record (used by ``leanformer compare``'s progress bars).
    """

    def __init__(self, run_cfg: RunConfig, data, model: TransformerLM | None = None,
                 out_dir: str | Path | None = None, teacher: nn.Module | None = None,
                 on_log: Callable[[dict], None] | None = None, resume: bool = True):
        from leanformer.data import BatchSampler, eval_batches

        self.cfg = run_cfg.validate()
        tc = self.cfg.train
        self.ctx = dist_utils.context()
        self.device = resolve_device(tc.device) if not self.ctx.enabled else self.ctx.device
        refusal = cuda_graph_refusal(tc, self.device, self.ctx.world_size)
        if refusal is not None:  # before anything is written or resumed
            raise ConfigError(refusal)
        self.objective = self.cfg.objective  # clm | mlm
        self.masking: MaskingRule | None = None
        if self.objective == "mlm":
            data = self._add_mask_token(data, model)
        seed_everything(tc.seed)
        if model is None:
            model = TransformerLM(self.cfg.model)
        if self.objective == "mlm" and model.cfg.causal:
            raise ConfigError("train.objective=mlm needs an encoder, but the model given is causal "
                              "(model.causal=true)")
        if data.vocab_size > model.cfg.vocab_size:
            raise ConfigError(f"the data has {data.vocab_size} token ids but model.vocab_size is "
                              f"{model.cfg.vocab_size}; raise model.vocab_size")
        self.model = model.to(self.device)
        tags = param_tags(self.model)  # before FSDP2 replaces the parameters
        self.wrapped = dist_utils.wrap(self.model, tc, self.ctx)
        self.optimizer = build_optimizer(self.model, tc, tags)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        self.sampler = BatchSampler(data.train, tc.batch_size, tc.seq_len, tc.seed,
                                    rank=self.ctx.rank, world_size=self.ctx.world_size, order=tc.sampling)
        self.val = eval_batches(data.val, tc.batch_size, tc.seq_len, tc.eval_batches)
        if self.masking is not None:  # (inputs, targets) masked once with the fixed evaluation seed
            self.val = masked_eval_batches(self.val, self.masking)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.tokenizer = data.tokenizer
        self.on_log = on_log
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.autocast = self._autocast_context()
        peak = tc.peak_flops or peak_flops_for(self.device)
        self.peak_flops = peak * self.ctx.world_size if peak else None
        self.flops_per_token = self.model.flops_per_token(tc.seq_len)
        self.lock = OutputLock(self.out_dir).acquire() if self.out_dir is not None and self.ctx.is_main else None
        if self.out_dir is not None:
            found = latest_checkpoint(self.out_dir / "checkpoint") if resume else None
            if found is not None:
                self._resume(found)
            self._restart_metrics()
        enable_fast_matmul(self.device)
        self.compiled = compile_enabled(tc.compile, self.device)
        if self.compiled:  # the whole model (forward + loss) is one graph: no graph breaks (GPU check)
            self.wrapped = torch.compile(self.wrapped, mode=None if tc.compile_mode == "default" else tc.compile_mode)

    # ------------------------------------------------------------------ pieces
    def _add_mask_token(self, data, model: TransformerLM | None):
        """MLM: ``data`` with a mask token (:func:`leanformer.data.with_mask_token`) and the masking rule.
        A model built here gets the one extra embedding row that a ``[MASK]`` added to the tokenizer needs."""
        plain = data.vocab_size
        data, self.masking = masking_rule(data, self.cfg.train.mask_rate)
        if model is None and self.cfg.model.vocab_size == plain < data.vocab_size:
            self.cfg.model.vocab_size = data.vocab_size
        return data

    def _mask(self, x: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM inputs and targets of training window ``x``, seeded by (seed, step, micro-batch, rank)."""
        g = seeded_generator(self.cfg.train.seed, self.step, micro, self.ctx.rank)
        return self.masking(x, g)

    def _autocast_context(self):
        dtype = self.cfg.train.dtype
        if dtype == "bfloat16" or (dtype == "auto" and self.device.type == "cuda"):
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tc = self.cfg.train
        distill = self.teacher is not None and tc.distill_weight > 0
        with self.autocast():
            logits, loss = self.wrapped(x, y, return_logits=distill)  # no logits: no zero gradient for them
            if distill:
                with torch.no_grad():
                    t_logits, _ = self.teacher(x)
                tau = tc.distill_temperature
                kl = F.kl_div(F.log_softmax(logits.float() / tau, -1), F.log_softmax(t_logits.float() / tau, -1),
                              log_target=True, reduction="batchmean") * tau**2 / x.shape[1]
                loss = loss + tc.distill_weight * kl
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (the same batches for every arm and step)."""
        return self.evaluate_metrics()["val_loss"]

    @torch.no_grad()
    def evaluate_metrics(self) -> dict[str, float]:
        """The validation metrics: ``val_loss`` (next-token loss, or MLM loss over the masked positions) and,
        for MLM, ``val_mlm_acc`` (top-1 accuracy over the masked positions)."""
        self.model.eval()
        if self.masking is not None:
            m = mlm_metrics(self.wrapped, self.val, self.device, self.autocast)
            self.model.train()
            loss, acc = m["loss"], m["accuracy"]
            if self.ctx.enabled:  # every rank evaluates the same batches: the mean keeps the ranks in step
                both = torch.tensor([loss, acc], dtype=torch.float64, device=self.device)
                loss, acc = dist_utils.mean_across_ranks(both, self.ctx).tolist()
            return {"val_loss": loss, "val_mlm_acc": acc}
        losses = []
        for x, y in self.val:
            with self.autocast():
                _, loss = self.wrapped(x.to(self.device), y.to(self.device), return_logits=False)
            losses.append(loss.detach().to(torch.float32, copy=True))  # a CUDA graph's next replay reuses its output
        self.model.train()
        return {"val_loss": dist_utils.mean_across_ranks(torch.stack(losses).mean(), self.ctx).item()}

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.on_log is not None:
            self.on_log(record)
        if self.out_dir is not None and self.ctx.is_main:
            metrics_file.append(self.out_dir / "metrics.jsonl", record)

    def _restart_metrics(self) -> None:
        """``metrics.jsonl`` cut back to the resumed step (a fresh file at step 0); history to match."""
        file = self.out_dir / "metrics.jsonl"
        if self.ctx.is_main:
            self.history = metrics_file.restart_at(file, self.step)
        elif self.step > 0:
            self.history = [r for r in metrics_file.read_records(file) if r["step"] <= self.step]

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
            "optimizer": dist_utils.optimizer_state(self.model, self.optimizer),
            "sampler": self.sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def save(self) -> Path | None:
        """Write ``out_dir/checkpoint`` in the single-process format, from rank 0 (weights and optimizer
        state gathered first under FSDP2, so it resumes on any number of processes)."""
        if self.out_dir is None:
            return None
        weights = dist_utils.model_state(self.model)
        state = self.state()
        path = self.out_dir / "checkpoint"
        if self.ctx.is_main:
            metrics_file.sync(self.out_dir / "metrics.jsonl")  # the records up to this step survive a power loss
            save_checkpoint(path, self.model, self.cfg, state, tokenizer=self.tokenizer, weights=weights)
        dist_utils.barrier(self.ctx)
        return path

    def _resume(self, path: Path) -> None:
        if self.ctx.enabled:  # every rank reads the full state; FSDP2 keeps its own shard
            dist_utils.load_model_state(self.model, read_weights(path))
            state = read_trainer_state(path)
        else:
            state = load_checkpoint(path, self.model)
        if not state:
            raise CheckpointError(f"{path} has no trainer state to resume from")
        dist_utils.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train until ``train.steps`` (or ``stop_after`` steps in this call); returns the metrics history.

        SIGINT / SIGTERM finish the current step, save, and raise :class:`TrainingInterrupted`.
        """
        if self.lock is not None:
            self.lock.acquire()  # again, if an earlier fit() released it
        try:
            with StopRequest(announce=self.ctx.is_main) as stop:
                return self._fit(stop_after, stop)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self, stop_after: int | None, stop: StopRequest) -> list[dict[str, Any]]:
        tc = self.cfg.train
        timer = SaveTimer(tc.save_every_minutes)
        if self.out_dir is not None and self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum * self.ctx.world_size
        last = tc.steps if stop_after is None else min(tc.steps, self.step + stop_after)
        bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (tc.progress and self.ctx.is_main), leave=False)
        self.model.train()
        if self.step == 0 and self.step < last:
            self._log({"step": 0, "tokens": 0, "train_seconds": 0.0, **self.evaluate_metrics()})
        while self.step < last:
            t0 = time.perf_counter()
            lr = lr_at(self.step, tc)
            set_lr(self.optimizer, lr)
            loss_sum = 0.0
            for micro in range(tc.grad_accum):
                x, y = self.sampler.next_batch()
                if self.masking is not None:
                    x, y = self._mask(x, micro)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with dist_utils.no_sync_unless_last(self.wrapped, micro == tc.grad_accum - 1):
                    loss = self._loss(x, y) / tc.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip) \
                if tc.grad_clip > 0 else torch.tensor(0.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            # the mean over ranks (each rank's loss is its own micro-batches'); syncs the device for timing
            loss_value = float(dist_utils.mean_across_ranks(loss_sum, self.ctx))
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {self.step}; lower train.lr?")
            dt = time.perf_counter() - t0
            self.step += 1
            self.tokens += tokens_per_step
            self.train_seconds += dt
            record: dict[str, Any] = {"step": self.step, "tokens": self.tokens,
                                      "train_seconds": round(self.train_seconds, 4), "loss": loss_value,
                                      "lr": lr, "grad_norm": float(grad_norm), "tok_per_s": tokens_per_step / dt}
            if self.peak_flops:
                record["mfu"] = self.flops_per_token * tokens_per_step / dt / self.peak_flops
            if self.device.type == "cuda":
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if self.step % tc.eval_every == 0 or self.step == tc.steps:
                record.update(self.evaluate_metrics())
                if self.masking is None:
                    record["val_ppl"] = math.exp(min(record["val_loss"], 50))
            if self.step % tc.log_every == 0 or "val_loss" in record:
                self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", **({"val": f"{record['val_loss']:.3f}"}
                                                         if "val_loss" in record else {}))
            stop_now, time_due = agree(stop.signum is not None, timer.due(), self.ctx)
            if stop_now and self.step < last:  # (at the last step the final save below follows anyway)
                bar.close()
                path = self.save()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.step, path)
            if self.step < tc.steps and (time_due or (tc.save_every and self.step % tc.save_every == 0)):
                self.save()
                timer.reset()
        bar.close()
        if self.step >= tc.steps or stop_after is not None:
            self.save()
        return self.history


def train(run_cfg: RunConfig, out_dir: str | Path | None = None, data=None, **kwargs) -> Trainer:
    """Load the data, build the model and train it; returns the finished :class:`Trainer`."""
    from leanformer.data import load_data

    if data is None:
        data = load_data(run_cfg.data, rank=dist_utils.context().rank, progress=run_cfg.train.progress)
    if data.tokenizer is not None:  # our tokenizer defines the vocabulary
        run_cfg.model.vocab_size = data.vocab_size
    trainer = Trainer(run_cfg, data, out_dir=out_dir, **kwargs)
    trainer.fit()
    return trainer
