"""The training loop: MSE on the noise, frozen SD1.5, trained projector + to_k_ip/to_v_ip (one readable loop).

It runs on accelerate, as IP-Adapter's training script does: one module (`AdapterModel`: frozen UNet,
projector, adapter layers) goes through `accelerator.prepare`, so under `accelerate launch` or torchrun it
is DistributedDataParallel (gloo on the CPU, nccl on GPUs) and the gradient all-reduce overlaps the backward
pass; `accelerator.accumulate` skips it on all but the last micro-batch of an optimizer step. Mixed precision
(autocast, fp16 loss scaling) is accelerate's too. Checkpoints are our own file (below), not `save_state`.

Determinism is by construction, not by saved RNG streams: every example's randomness (conditioning
dropout, timestep, noise, the VAE sample) comes from a generator seeded by (seed, optimizer step,
micro-step, its slot in the global batch), and the data order from (seed, epoch). So a resumed run
continues bit-identically, and N processes with batch B see exactly what one process with batch N*B sees.
"""
from __future__ import annotations

import csv
import glob
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin

from ipadapter_instruct.engine.adapter import save_adapter
from ipadapter_instruct.engine.attention import choose_impls
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.interrupt import forget, remove_if_killed
from ipadapter_instruct.engine.loading import load_base, load_image_encoder
from ipadapter_instruct.engine.safe_load import load_pickle

from ipadapter_instruct.train.data import TrainDataset, collate, read_manifest
from ipadapter_instruct.train.instructions import load_banks
from ipadapter_instruct.train.model import AdapterModel, init_adapter, native_resolution

log = logging.getLogger(__name__)
DROP_IMAGE, DROP_TEXT, DROP_BOTH = 0.05, 0.05, 0.05  # IP-Adapter's conditioning dropout
VAL_SEED = 2**40  # validation example i always draws from seed VAL_SEED + i


@dataclass(frozen=True)
class TrainConfig:
    model: str
    image_encoder: str
    data: str
    out: str
    init_adapter: str | None = None
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    resolution: int | None = None       # pixels; None: the model's native size
    mixed_precision: str = "no"          # no | fp16 (GPU) | bf16
    save_every: int = 500
    resume: bool = False
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float | None = None
    gradient_checkpointing: bool = False
    val_fraction: float = 0.05
    on_bad_data: str = "fatal"           # fatal | skip
    seed: int = 0
    device: str | None = None
    progress: bool = True


def held_out(n: int, fraction: float, global_batch: int) -> int:
    """Validation examples of n: round(n x fraction), at least one while the rest still fill a global batch (a
    small set would otherwise validate nothing); 0 (warned: val_loss stays blank) when none can be spared."""
    n_val = min(n - 1, round(n * fraction)) if fraction > 0 else 0
    if fraction > 0 and n_val == 0 and n - 1 >= global_batch:
        n_val = 1
    if n_val == 0:
        why = "--val-fraction is 0" if fraction <= 0 else \
            f"{n} examples leave none over a global batch of {global_batch}"
        log.warning("no validation examples (%s): val_loss stays blank; give more examples", why)
    return n_val


def capped_warmup(warmup: int, steps: int) -> int:
    """The learning-rate warm-up in optimizer steps, at most a tenth of the run (a 100-step warm-up would outlast
    a short trial); warned when capped."""
    cap = max(1, steps // 10)
    if warmup > cap:
        log.warning("warm-up capped to %d of %d steps (--warmup-steps %d is longer than a tenth of the run)",
                    cap, steps, warmup)
    return max(1, min(warmup, cap))


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """One process, or one of the processes torchrun / `accelerate launch` started (DDP; gloo on the CPU)."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    asked = {"--mixed-precision": ("ACCELERATE_MIXED_PRECISION", "no", cfg.mixed_precision),
             "--grad-accum": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1", str(cfg.grad_accum))}
    for flag, (var, default, ours) in asked.items():  # what accelerate launch's flags or config ask for
        launched = os.environ.get(var, default)
        if launched not in (default, ours):
            raise EngineError(f"accelerate launch sets {var}={launched} but the trainer's {flag} is {ours}: "
                              f"pass {flag} {launched} to python -m train (it decides)")
    if not dist.is_initialized():  # accelerate's state is per process: a fresh one per run, so train() can run again
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    acc = Accelerator(cpu=device == "cpu", mixed_precision=cfg.mixed_precision,
                      gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum),
                      step_scheduler_with_optimizer=False)  # the warm-up counts optimizer steps, for any world size
    if cfg.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise EngineError("--mixed-precision fp16 needs a GPU (fp16 loss scaling); on the CPU use bf16 or no")
    kind = acc.distributed_type.name
    if kind != "NO" and not kind.startswith("MULTI_"):
        raise EngineError(f"accelerate launched the trainer with {kind}; it runs on one device or data parallel "
                          "(DDP: torchrun, accelerate launch --multi_gpu) only, its checkpoints hold whole tensors")
    if (acc.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
            and "MASTER_ADDR" in os.environ):
        log.warning("accelerate launch --cpu started one process (more need --mpirun_hostfile); for N processes "
                    "on the CPU use accelerate launch --multi_gpu --num_processes N -m train ... (gloo)")
    return acc


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.accelerator = acc = make_accelerator(cfg)
        self.world, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        banks = load_banks()  # the data first: a bad manifest fails before gigabytes of weights load
        examples = read_manifest(cfg.data, tasks=tuple(banks), on_error=cfg.on_bad_data)
        parts = load_base(cfg.model, torch.float32)
        self.unet, self.vae, self.text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
        self.tokenizer, self.noise_sched = parts["tokenizer"], parts["scheduler"]
        if cfg.resolution is None:  # recorded resolved, so checkpoints say what was trained on
            self.cfg = cfg = replace(cfg, resolution=native_resolution(self.unet, self.vae))
        self.image_encoder, self.processor = load_image_encoder(cfg.image_encoder, torch.float32)
        torch.manual_seed(cfg.seed)  # a fresh adapter's initial weights
        self.adapter = init_adapter(self.unet, self.image_encoder.config.hidden_size,
                                    self.text_encoder.config.hidden_size, cfg.init_adapter)
        for m in (self.vae, self.text_encoder, self.image_encoder):
            m.to(self.device).eval().requires_grad_(False)
        self.net = AdapterModel(self.unet, self.adapter).to(self.device).train()
        self.trained, self.cross = self.net.trained, self.net.cross
        choose_impls(self.unet, self.cross, self.device, torch.float32, "auto")
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.params = [p for p in self.trained.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = capped_warmup(cfg.warmup_steps, cfg.steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup))  # linear warm-up, then constant
        # self.net is the AdapterModel; self.model what accelerate makes of it: DDP around it when distributed,
        # its forward under autocast with mixed precision
        self.model, self.opt, self.sched = acc.prepare(self.net, opt, sched)
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay else None
        # fp16 gradients underflow without loss scaling: accelerate's GradScaler (GPU); bf16 (fp32's range) and
        # fp32 need none, and a disabled one keeps the checkpoint's "scaler" entry
        self.scaler = acc.scaler or torch.amp.GradScaler(self.device.type, enabled=False)
        self._split(examples, banks)
        self.step = self.epoch = self.pos = 0
        self._perm = (-1, None)

    # ---- data ---------------------------------------------------------------------------------------------

    def _split(self, examples, banks) -> None:
        cfg = self.cfg
        order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(order)
        n_val = held_out(len(examples), cfg.val_fraction, cfg.batch_size * self.world)
        val = [examples[i] for i in sorted(order[:n_val])]
        train = [examples[i] for i in sorted(order[n_val:])]
        self.data = TrainDataset(train, banks, self.processor, cfg.resolution, cfg.seed)
        self.val = TrainDataset(val, banks, self.processor, cfg.resolution, cfg.seed + 1) if val else None
        self.global_batch = cfg.batch_size * self.world
        self.per_epoch = len(self.data) // self.global_batch
        if self.per_epoch == 0:
            raise EngineError(f"{len(self.data)} training examples cannot fill one global batch of "
                              f"{self.global_batch} (batch size {cfg.batch_size} x {self.world} processes)")

    def _next_batch(self) -> tuple[dict, list[int]]:
        # this process's share of the next global micro-batch, and the slots (global positions) it holds
        if self.pos >= self.per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        if self._perm[0] != self.epoch:  # the epoch's data order, drawn once per epoch
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.epoch)
            self._perm = (self.epoch, torch.randperm(len(self.data), generator=g))
        perm = self._perm[1]
        slots = list(range(self.rank * self.cfg.batch_size, (self.rank + 1) * self.cfg.batch_size))
        idx = perm[self.pos * self.global_batch:(self.pos + 1) * self.global_batch]
        self.pos += 1
        self.data.set_epoch(self.epoch)
        return collate([self.data[int(idx[s])] for s in slots]), slots

    # ---- the loss -----------------------------------------------------------------------------------------

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def loss(self, batch: dict, seeds: list[int], model=None) -> torch.Tensor:
        """MSE between the UNet's noise prediction and the noise, for one micro-batch, through `model` (the
        prepared one, DDP when distributed; validation passes the bare AdapterModel: no collectives)."""
        model = self.model if model is None else model
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        pixels = batch["pixel_values"].to(self.device)
        clip = batch["clip_pixels"].to(self.device)
        captions, instructions = list(batch["caption"]), list(batch["instruction"])
        for i, g in enumerate(gens):  # conditioning dropout: [0, .05) image, [.05, .10) text, [.10, .15) both
            r = torch.rand((), generator=g).item()
            if r < DROP_IMAGE or DROP_IMAGE + DROP_TEXT <= r < DROP_IMAGE + DROP_TEXT + DROP_BOTH:
                clip[i] = 0  # the zero image, as the engine's unconditional branch
                instructions[i] = ""
            if DROP_IMAGE <= r < DROP_IMAGE + DROP_TEXT + DROP_BOTH:
                captions[i] = ""
        with torch.no_grad():
            post = self.vae.encode(pixels).latent_dist
            eps_vae = torch.stack([torch.randn(post.mean.shape[1:], generator=g) for g in gens]).to(self.device)
            latents = (post.mean + post.std * eps_vae) * self.vae.config.scaling_factor
            text = self._encode_text(captions)
            instruct = self._encode_text(instructions)
            image = self.image_encoder(clip, output_hidden_states=True).hidden_states[-2]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(self.device)
        t = torch.stack([torch.randint(0, self.noise_sched.config.num_train_timesteps, (), generator=g)
                         for g in gens]).to(self.device)
        noisy = self.noise_sched.add_noise(latents, noise, t)
        target = noise if self.noise_sched.config.prediction_type == "epsilon" else \
            self.noise_sched.get_velocity(latents, noise, t)
        pred = model(noisy, t, text, image, instruct)
        return F.mse_loss(pred.float(), target.float())

    def _seeds(self, micro: int, slots: list[int]) -> list[int]:
        base = (self.cfg.seed * 1_000_003 + self.step * self.cfg.grad_accum + micro) * self.global_batch
        return [base + s for s in slots]

    # ---- one optimizer step -------------------------------------------------------------------------------

    def train_step(self) -> float:
        acc = self.accelerator
        self.opt.zero_grad(set_to_none=True)  # here, not after the step: the step's gradients stay readable
        total = 0.0
        for micro in range(self.cfg.grad_accum):
            batch, slots = self._next_batch()
            with acc.accumulate(self.model):  # DDP's all-reduce on the last micro-batch only
                with acc.autocast():  # the frozen encoders too, not only the prepared module
                    loss = self.loss(batch, self._seeds(micro, slots))
                acc.backward(loss)  # divides by grad_accum; fp16: scaled
            total += loss.item() / self.cfg.grad_accum
        assert acc.sync_gradients, "accumulate() ended an optimizer step before its last micro-batch"
        if self.world > 1:  # the logged loss: the mean over processes
            total = acc.reduce(torch.tensor(total, dtype=torch.float64, device=self.device), "mean").item()
        acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)  # fp16: unscales first
        self.opt.step()  # fp16: skipped on an inf/nan, and the scale lowered
        self.sched.step()
        self.step += 1
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p, 1 - self.cfg.ema_decay)
        return total

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean loss over the held-out split, each example with fixed randomness (comparable across steps)."""
        if self.val is None:
            return None
        losses = []
        self.net.eval()
        for start in range(0, len(self.val), self.cfg.batch_size):
            idx = range(start, min(start + self.cfg.batch_size, len(self.val)))
            batch = collate([self.val[i] for i in idx])
            with self.accelerator.autocast():
                losses.append(self.loss(batch, [VAL_SEED + i for i in idx], self.net).item() * len(idx))
        self.net.train()
        return sum(losses) / len(self.val)

    # ---- checkpoints --------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos, "model": self.trained.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "ema": self.ema,
                "scaler": self.scaler.state_dict(),
                "config": asdict(self.cfg), "world": self.world}

    def save_checkpoint(self) -> str:
        folder = os.path.join(self.cfg.out, "checkpoints")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{self.step:08d}.pt")
        remove_if_killed(path + ".tmp")  # (Ctrl-C: engine/interrupt.py)
        try:
            torch.save(self.state(), path + ".tmp")
            os.replace(path + ".tmp", path)
        finally:
            forget(path + ".tmp")
        return path

    def resume(self) -> str | None:
        found = sorted(glob.glob(os.path.join(self.cfg.out, "checkpoints", "step-*.pt")))
        if not found:
            return None
        st = load_pickle(found[-1], "checkpoint", map_location=self.device)  # tensors and plain values only
        if st["world"] * st["config"]["batch_size"] != self.global_batch:
            raise EngineError(f"{found[-1]} was written with a global batch of "
                              f"{st['world'] * st['config']['batch_size']}; this run has {self.global_batch}")
        self.trained.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        self.ema = st["ema"]
        self.step, self.epoch, self.pos = st["step"], st["epoch"], st["pos"]
        return found[-1]

    def save_adapter(self) -> str:
        path = os.path.join(self.cfg.out, "adapter.safetensors")
        if self.ema is not None:  # the averaged weights are the result
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    p.copy_(e)
        save_adapter(path, self.adapter.projector, self.adapter.layers)
        return path


class Logger:
    """log.csv (step, loss, lr, val_loss) and TensorBoard when installed; rank 0 only."""

    def __init__(self, out: str, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(out, "log.csv")
        self.tb = None
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        rows = []
        if resume_step and os.path.exists(self.path):  # drop what came after the checkpoint
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, ["step", "loss", "lr", "val_loss"])
            w.writeheader()
            w.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out, "tensorboard"))
        except ImportError:
            log.info("tensorboard is not installed: logging to %s only", self.path)

    def row(self, step: int, loss: float, lr: float, val: float | None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([step, "" if math.isnan(loss) else f"{loss:.6g}", f"{lr:.6g}",
                                    "" if val is None else f"{val:.6g}"])
        if self.tb is not None:
            if not math.isnan(loss):
                self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("lr", lr, step)
            if val is not None:
                self.tb.add_scalar("val_loss", val, step)


def train(cfg: TrainConfig) -> str:
    """Run the training; returns the path of OUT/adapter.safetensors."""
    from tqdm.auto import tqdm

    trainer = Trainer(cfg)
    resumed = trainer.resume() if cfg.resume else None
    main = trainer.accelerator.is_main_process
    if main:
        print(f"training on {trainer.device.type}, {trainer.world} process(es), global batch "
              f"{trainer.global_batch} x {cfg.grad_accum} accumulated, mixed precision {cfg.mixed_precision}")
    if main and resumed:
        print(f"resumed from {resumed} at step {trainer.step}")
    logger = Logger(cfg.out, trainer.step, main)
    if trainer.step == 0 and main:  # where validation starts from
        logger.row(0, float("nan"), trainer.sched.get_last_lr()[0], trainer.validation_loss())
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc="train", disable=not (main and cfg.progress))
    while trainer.step < cfg.steps:
        loss = trainer.train_step()
        if not math.isfinite(loss):
            raise EngineError(f"loss became {loss} at step {trainer.step}; lower --lr or use --mixed-precision no")
        val = None
        if trainer.step % cfg.save_every == 0 or trainer.step == cfg.steps:
            val = trainer.validation_loss() if main else None
            if main:
                trainer.save_checkpoint()
        logger.row(trainer.step, loss, trainer.sched.get_last_lr()[0], val)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    path = trainer.save_adapter() if main else os.path.join(cfg.out, "adapter.safetensors")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # ends the process group of a distributed run
    return path
