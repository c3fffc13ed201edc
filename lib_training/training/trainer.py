"""The training loop every method shares.

One step: take a batch (images as cached VAE latents), draw noise and timesteps from generators
seeded by (seed, step), noise the latents, condition on the batch's prompts (with the method's
embeddings, if any), predict, and take the loss against epsilon or v. Gradients accumulate over
`grad_accumulation` batches before each optimizer step; trained parameters stay fp32 while the model
computes under fp16/bf16 autocast on a GPU.

Everything random is derived from (seed, step) or (seed, epoch, item), never from a global
generator, so a run that is interrupted and resumed ends bit-identical to one that was not.

The model is never modified: the method attaches on entry and detaches in `finally`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib_training.dataset import Batch, LatentCache, LatentSampler, TrainingDataset
from lib_training.errors import ConfigError, UserError
from lib_training.formats.atomic import write_text
from lib_training.formats.fingerprint import weights_fingerprint
from lib_training.model.diffusion import Conditioning, DiffusionModel, SizeConditioning
from lib_training.model.memory_format import channels_last, use_channels_last
from lib_training.model.sampler import SampleSettings, generate
from lib_training.seeding import derive_seed
from lib_training.training.compiled import CompiledUNet, compile_plan
from lib_training.training.config import LoopConfig
from lib_training.training.loss import diffusion_loss, multires_noise, noise_offset
from lib_training.training.lr_schedule import StepSchedule, parse_schedule, set_learning_rate
from lib_training.training.method import StepOutputs, TrainingMethod
from lib_training.training.optim import all_finite, build_optimizer, clip_gradients
from lib_training.training.outputs import LossRecord, RunFolder
from lib_training.training.peak_memory import peak_memory, reset_peak_memory
from lib_training.training.progress import Progress, RateMeter
from lib_training.training.text_cache import MAX_PROMPTS, TextOutputCache, text_caching_problem

ProgressCallback = Callable[[Progress], None]
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class TrainingError(UserError):
    """Training stopped because of a problem it found (NaN loss, out of memory, ...)."""


@dataclass(frozen=True)
class TrainingResult:
    result: Path  # the result file (the newest good state)
    step: int  # optimizer steps done
    interrupted: bool
    loss: float | None  # mean loss of the last 20 steps
    folder: Path
    resumed_from: int | None = None  # the step a resumed run continued from (None: a new run)
    validation_loss: float | None = None  # the held-out images' loss at the end (None: none held out)


def autocast_dtype(precision: str, device: torch.device, weights: torch.dtype = torch.float32) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32.

    "auto" follows half-precision weights (a WebUI's fp16 model must compute under fp16
    autocast, with loss scaling), else bf16 or fp16 on a GPU, and fp32 on the CPU.
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        if weights in (torch.float16, torch.bfloat16):
            return weights
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class Trainer:
    """Runs one method on one model over one dataset; see the module docstring."""

    def __init__(
        self,
        model: DiffusionModel,
        method: TrainingMethod,
        dataset: TrainingDataset,
        loop: LoopConfig,
        folder: RunFolder,
        *,
        settings: dict[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        cache_dir: Path | None = None,
        file_metadata: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.method = method
        self.dataset = dataset
        self.loop = loop
        self.folder = folder
        self.settings = settings or {}
        self.on_progress = on_progress or (lambda progress: None)
        self.should_stop = should_stop or (lambda: False)
        self.cache_dir = cache_dir  # where the disk caches that `loop` turns on live
        self.file_metadata = file_metadata or {}  # written into every saved file (e.g. the model's name and hash)
        self.autocast = autocast_dtype(loop.precision, model.device, model.dtype)
        self.lr_schedule: StepSchedule = self._lr_schedule(loop.lr)
        self.clip_schedule: StepSchedule | None = None
        if loop.clip_grad != "none":
            self.clip_schedule = parse_schedule(loop.clip_grad_value, total_steps=loop.steps, what="gradient clip")
        self.total_steps = min(loop.steps, self.lr_schedule.end_step or loop.steps)
        self.losses: list[LossRecord] = []
        self._saved = False  # this run has written a result or a numbered copy
        self.speed: dict[str, Any] = {}  # what the run used: channels_last, compile (see _fast_path)
        self._latest_preview: Path | None = None
        self._texts: TextOutputCache | None = None  # frozen text encoders' outputs (set up by the run)
        self._vae_away: contextlib.ExitStack | None = None  # holds the VAE's offload during the steps
        self._class_sampler = None  # batches of the regularization images, if any
        self.validation: list[tuple[int, float]] = []  # (step, loss of the held-out images)

    # --- the run ----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainingResult:
        """Train; a run that fails, or is stopped before its first step, leaves no folder behind (and an
        earlier run moved aside for it is moved back: `RunFolder.discard`)."""
        self._saved = False
        self.folder.begin(resume)
        try:
            with self._fast_path():
                result = self._run(resume)
        except BaseException:
            if not self._saved and not resume:
                self.folder.discard()
            raise
        if not self._saved and not resume:
            self.folder.discard()
        return result

    @contextlib.contextmanager
    def _fast_path(self):
        """For this run: channels-last UNet and VAE weights (restored on exit) and the UNet call
        compiled through a wrapper (the model's own `unet` comes back on exit); see LoopConfig."""
        model, loop = self.model, self.loop
        reset_peak_memory(model.device)
        unet = model.unet
        one_forward = loop.grad_accumulation == 1 and self.dataset.class_data is None
        plan = compile_plan(loop.compile, model.device, one_forward_per_backward=one_forward)
        self.speed = {"channels_last": use_channels_last(loop.channels_last, model.device), "compile": plan.label}
        if plan.note:
            self.speed["compile_note"] = plan.note
            self._report("preparing", 0, message=plan.note)
        if plan.mode is not None:
            model.unet = CompiledUNet(unet, on_fallback=self._compile_fell_back, mode=plan.mode)
        modules = [model.modules[key] for key in ("unet", "vae") if key in model.modules]
        try:
            with channels_last(modules, enabled=self.speed["channels_last"]):
                yield
        finally:
            model.unet = unet

    def _compile_fell_back(self, message: str) -> None:
        self.speed["compile"] = "failed: " + message
        self._report("training", self.losses[-1].step if self.losses else 0, message=message)

    def _run(self, resume: bool) -> TrainingResult:
        self.method.begin_run(self.dataset, self.loop)
        self._report("preparing", 0)
        prompts = self._prompts_to_cache()  # checked before the slow work
        cache = LatentCache(
            self._encode,
            weights_fingerprint({"vae": self.model.modules["vae"]}),
            self.cache_dir if self.loop.cache_latents_to_disk else None,
        )
        self._report("caching latents", 0, message=f"encoding {len(self.dataset.views())} images with the VAE")
        cache.fill(
            self.dataset.views(),
            self.dataset.load_image,
            batch_size=max(1, self.loop.batch_size),
            progress=lambda done, total: self._report("caching latents", done, total=total),
        )
        if not self.method.trains_text_encoders:
            disk = self.cache_dir if self.loop.cache_text_outputs_to_disk else None
            self._texts = TextOutputCache(self.model, disk)
        if prompts is not None and self._texts is not None:
            self._report("caching text", 0, message=f"encoding {len(prompts)} prompts with the text encoders")
            with self._autocast():
                self._texts.fill(prompts, lambda done, total: self._report("caching text", done, total=total))
        latents_for = LatentSampler(self.loop.latent_sampling, self.loop.seed)
        sampler = self.dataset.sampler(self.loop.batch_size)
        class_data = self.dataset.class_data
        self._class_sampler = class_data.sampler(self.loop.batch_size) if class_data is not None else None

        with self.method.attached(self.model), self._gradient_checkpointing(), self._unused_parts_away():
            groups = self.method.param_groups()
            params = [p for group in groups for p in group.params]
            schedules = [self.lr_schedule if g.lr is None else self._lr_schedule(g.lr) for g in groups]
            optimizer = build_optimizer(
                self.loop.optimizer,
                [{"params": g.params, "lr": s.value_at(0)} for g, s in zip(groups, schedules)],
                self.lr_schedule.value_at(0),
                weight_decay=self.loop.weight_decay,
            )
            scaler = self._grad_scaler()
            step = 0
            if resume:
                step = self._restore(self.folder.load_resume_state(), optimizer, scaler, sampler)
                self._report(
                    "preparing",
                    step,
                    message=f"resumed the run at step {step}: same optimizer state, data order and random numbers",
                )
            elif (start := self.method.initial_optimizer_state()) is not None:
                optimizer.load_state_dict(start)
            first_step = step
            self.folder.write_config(self._config_record(resume))
            rate = RateMeter()
            rate.mark(step)
            started = time.perf_counter()
            interrupted = False

            while step < self.total_steps:
                if self.should_stop():
                    interrupted = True
                    break
                try:
                    total_loss, lr, epoch = self._step(
                        step, optimizer, schedules, scaler, sampler, cache, latents_for, params
                    )
                except _OUT_OF_MEMORY as error:
                    optimizer.zero_grad(set_to_none=True)
                    self._free_memory()
                    raise TrainingError(
                        f"out of memory at step {step + 1} (batch size {self.loop.batch_size}, training size "
                        f"{self.dataset.config.size}). Lower the batch size or the training size, turn on "
                        "gradient checkpointing, or close other programs using the GPU."
                    ) from error
                step += 1
                self.losses.append(LossRecord(step, total_loss, lr, epoch, time.perf_counter() - started))
                rate.mark(step)
                self._periodic_outputs(step, optimizer, scaler, sampler)
                if self.loop.validate_every and step % self.loop.validate_every == 0 and step < self.total_steps:
                    self._validate(step, cache)
                self._report("training", step, loss=total_loss, lr=lr, rate=rate)

            if step > first_step or not interrupted:  # stopped before any step: nothing new to save
                if self.dataset.validation:
                    self._validate(step, cache)
                self._report("saving", step)
                self._save_result(step, optimizer)
                self._save_resume(step, optimizer, scaler, sampler)
                self.folder.write_losses(self.losses)
            end = {"step": step, "interrupted": interrupted, **self.speed, **peak_memory(self.model.device)}
            self.folder.write_config({**self._config_record(resume), "end": end})
        recent = [r.loss for r in self.losses[-20:]]
        self._report("done", step, message="interrupted" if interrupted else "finished")
        return TrainingResult(
            self.folder.result,
            step,
            interrupted,
            sum(recent) / len(recent) if recent else None,
            self.folder.root,
            resumed_from=first_step if resume else None,
            validation_loss=self.validation[-1][1] if self.validation else None,
        )

    # --- one step -------------------------------------------------------------------------
    def _lr_schedule(self, text: str) -> StepSchedule:
        loop = self.loop
        return parse_schedule(
            text,
            name=loop.lr_scheduler,
            total_steps=loop.steps,
            warmup_steps=loop.lr_warmup_steps,
            cycles=loop.lr_cycles,
        )

    def _step(
        self, step: int, optimizer, schedules, scaler, sampler, cache, latents_for, params
    ) -> tuple[float, float, int]:
        """One optimizer step over `grad_accumulation` batches; returns (mean loss, lr of the first group, epoch)."""
        lr = set_learning_rate(optimizer, schedules, step)
        total_loss = 0.0
        epoch = 0
        for _ in range(self.loop.grad_accumulation):
            plan = next(sampler)
            epoch = plan.epoch
            batch = self.dataset.batch(plan, load_images=False)
            loss = self._loss(batch, latents_for(cache, batch.views, step, self.dataset.load_image), step)
            if self._class_sampler is not None:  # regularization: a batch of class images, weighted
                class_data = self.dataset.class_data
                assert class_data is not None
                class_batch = class_data.batch(next(self._class_sampler), load_images=False)
                class_latents = latents_for(cache, class_batch.views, step, class_data.load_image)
                class_loss = self._loss(class_batch, class_latents, step, stream="class-noise")
                loss = loss + self.dataset.config.prior_loss_weight * class_loss
            if not torch.isfinite(loss):
                self._stop_on_nan(step, loss)
            scaled = loss / self.loop.grad_accumulation
            (scaler.scale(scaled) if scaler else scaled).backward()
            total_loss += loss.item() / self.loop.grad_accumulation
        if scaler:
            scaler.unscale_(optimizer)
        if self.clip_schedule is not None:
            clip_gradients(params, self.loop.clip_grad, self.clip_schedule.value_at(step))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not all_finite(params):
            self._stop_on_nan(step, torch.tensor(float("nan")))
        return total_loss, lr, epoch

    def _free_memory(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _loss(self, batch: Batch, latents: Tensor, step: int, stream: str = "noise") -> Tensor:
        model = self.model
        latents = (latents * model.family.latent_scale).to(model.device)
        seed = derive_seed(self.loop.seed, stream, step, batch.plan.epoch, batch.plan.position)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator)
        if self.loop.noise_offset > 0:
            noise = noise_offset(noise, self.loop.noise_offset, generator)
        if self.loop.multires_noise_iterations > 0:
            noise = multires_noise(
                noise, self.loop.multires_noise_iterations, self.loop.multires_noise_discount, generator
            )
        timesteps = torch.randint(0, model.schedule.num_steps, (latents.shape[0],), generator=generator)
        noise, timesteps = noise.to(model.device), timesteps.to(model.device)
        x_t = model.schedule.add_noise(latents, noise, timesteps)
        target = model.schedule.target(latents, noise, timesteps)
        sizes = None
        if model.family.is_sdxl:
            sizes = [
                SizeConditioning(original, crop, batch.target_size)
                for original, crop in zip(batch.original_sizes, batch.crops)
            ]
        with self._autocast():
            cond = self._conditioning(batch.prompts, sizes)
            prediction = model.predict(x_t, timesteps, cond)  # casts x_t to the model's dtype
        weight = None if batch.weights is None else batch.weights.to(model.device)
        prediction, target = prediction.float(), target.float()
        loss = diffusion_loss(
            prediction,
            target,
            weight=weight,
            timesteps=timesteps,
            schedule=model.schedule,
            min_snr_gamma=self.loop.min_snr_gamma or None,
        )
        return self.method.objective(StepOutputs(batch, x_t, timesteps, target, prediction, cond, loss))

    def _conditioning(self, prompts: list[str], sizes: list[SizeConditioning] | None) -> Conditioning:
        """The batch's conditioning; with frozen text encoders each prompt is encoded once, alone, and its
        output reused (so a resumed run computes the same values as an uninterrupted one)."""
        if self._texts is None:
            return self.model.encode_prompts(prompts, self.method.prompt_embeddings(), sizes)
        return self._texts.conditioning(prompts, sizes)

    def _generation_conditioning(
        self, prompts: list[str], embeddings: dict[str, Any], sizes: list[SizeConditioning] | None = None
    ) -> Conditioning | None:
        """Conditioning of prompts at a preview or validation, from the text outputs' cache when it can
        serve them (None: encode them)."""
        if self._texts is None or embeddings:
            return None
        return self._texts.conditioning(prompts, sizes)

    # --- text caching -----------------------------------------------------------------------------
    def _prompts_to_cache(self) -> list[str] | None:
        """With `cache_text_outputs`: every prompt of the run (previews' included), checked quickly; else None."""
        loop, data = self.loop, self.dataset.config
        if not (loop.cache_text_outputs or loop.cache_text_outputs_to_disk):
            return None
        problem = text_caching_problem(self.method.trains_text_encoders, data.prompts_vary)
        if problem:
            raise ConfigError(problem)
        prompts = self.dataset.all_prompts()
        if loop.preview_every:
            prompts += [self.preview_prompt(), loop.preview_negative]
        if len(prompts) > MAX_PROMPTS:
            raise ConfigError(
                f"the run can draw {len(prompts):,} different prompts (captions x template lines), more than the "
                f"{MAX_PROMPTS:,} whose text outputs can be cached; use a template with fewer lines, or turn "
                "cache_text_outputs off"
            )
        return prompts

    # --- placement --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _unused_parts_away(self):
        """For the steps, off the GPU: the text encoders when every prompt's output is cached, and the
        VAE (latents are cached; it comes back for previews: `_vae_back`) unless an inpainting UNet's
        neutral image conditioning needs it in every step. Back where they were on exit."""
        with contextlib.ExitStack() as stack:
            if self._texts is not None and self._texts.complete:
                stack.enter_context(self.model.offloaded("text"))
            if not self.model.family.is_inpainting:
                vae_away = stack.enter_context(contextlib.ExitStack())
                vae_away.enter_context(self.model.offloaded("vae"))
                self._vae_away = vae_away
            try:
                yield
            finally:
                self._vae_away = None

    @contextlib.contextmanager
    def _vae_back(self):
        """The VAE where it was while inside, if it is away for the steps (a preview decodes; an image
        changed on disk during the run is encoded again)."""
        away = self._vae_away
        if away is None:
            yield
            return
        away.close()
        try:
            yield
        finally:
            away.enter_context(self.model.offloaded("vae"))

    def _validate(self, step: int, cache: LatentCache) -> None:
        """The held-out images' mean loss, each at a fixed noise and timestep (the same at every
        evaluation), with the result applied as at generation; appended to validation.csv."""
        model = self.model
        losses = []
        with torch.no_grad(), self._autocast(), self.method.apply_for_generation(model) as embeddings:
            for index, (view, prompt) in enumerate(self.dataset.validation_items()):
                mean, _ = cache.get(view, self.dataset.load_image)
                latents = (mean[None] * model.family.latent_scale).to(model.device)  # [1, 4, h, w]
                generator = torch.Generator().manual_seed(derive_seed(self.loop.seed, "validation", index))
                noise = torch.randn(latents.shape, generator=generator).to(model.device)
                timesteps = torch.randint(0, model.schedule.num_steps, (1,), generator=generator).to(model.device)
                x_t = model.schedule.add_noise(latents, noise, timesteps)
                target = model.schedule.target(latents, noise, timesteps)
                cond = self._generation_conditioning([prompt], embeddings) or model.encode_prompts([prompt], embeddings)
                prediction = model.predict(x_t.to(model.dtype), timesteps, cond)
                losses.append(torch.nn.functional.mse_loss(prediction.float(), target.float()).item())
        value = sum(losses) / len(losses)
        self.validation.append((step, value))
        rows = "".join(f"{s},{v:.6g}\n" for s, v in self.validation)
        write_text(self.folder.root / "validation.csv", "step,validation_loss\n" + rows)
        self._report("validating", step, loss=value, message=f"validation loss {value:.6g} at step {step}")

    def _encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad(), self._vae_back():
            dist = self.model.encode_latent_distribution(images)
        return dist.mean.cpu(), dist.logvar.cpu()

    @contextlib.contextmanager
    def _gradient_checkpointing(self):
        if not self.loop.gradient_checkpointing:
            yield
            return
        fraction = self.loop.checkpoint_blocks
        if fraction < 1:
            self.model.set_gradient_checkpointing(True, fraction)
        else:
            self.model.set_gradient_checkpointing(True)
        try:
            yield
        finally:
            self.model.set_gradient_checkpointing(False)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=self.autocast)

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        if self.autocast is torch.float16 and self.model.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    def _stop_on_nan(self, step: int, loss: Tensor) -> None:
        if self._saved:
            kept = f"The last good result is {self.folder.result}."
        elif self.folder.archived is not None:
            kept = "Nothing of this run was saved; the earlier run of this name is kept as it was."
        else:
            kept = "Nothing was saved."
        fixes = ["lower the learning rate", "use gradient clipping"]
        if self.autocast is torch.float16:
            fixes.append("train in bf16 (or fp32) instead of fp16")
        elif self.autocast is torch.bfloat16:
            fixes.append("train in fp32 instead of bf16")
        advice = ", ".join(fixes[:-1]) + " or " + fixes[-1]
        raise TrainingError(
            f"training stopped at step {step + 1}: the loss became {loss.item()} (not a number). {kept} "
            f"To fix it, {advice}."
        )

    # --- outputs ----------------------------------------------------------------------------
    def _periodic_outputs(self, step: int, optimizer, scaler, sampler) -> None:
        if self.loop.save_every and step % self.loop.save_every == 0 and step < self.total_steps:
            self._report("saving", step)
            checkpoint = self.folder.checkpoint(step)
            self.method.save(checkpoint, step, self._file_metadata(step))
            self.method.save_optimizer_state(checkpoint, optimizer)
            self._saved = True
            self._save_result(step, optimizer)
            self._save_resume(step, optimizer, scaler, sampler)
            self.folder.write_losses(self.losses)
        if self.loop.preview_every and step % self.loop.preview_every == 0:
            self._report("previewing", step)
            self._preview(step)
            self.folder.write_losses(self.losses)

    def _save_result(self, step: int, optimizer) -> None:
        self.method.save(self.folder.result, step, self._file_metadata(step))
        self.method.save_optimizer_state(self.folder.result, optimizer)
        self._saved = True

    def _file_metadata(self, step: int) -> dict[str, str]:
        return {**self.file_metadata, "step": str(step), "sd_checkpoint_family": self.model.family.name}

    def _save_resume(self, step: int, optimizer, scaler, sampler) -> None:
        self.folder.save_resume_state(
            {
                "step": step,
                "method": self.method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "sampler": sampler.state_dict(),
                "class_sampler": self._class_sampler.state_dict() if self._class_sampler is not None else None,
                "losses": [r.__dict__ for r in self.losses],
                "validation": self.validation,
                "identity": self._identity(),
            }
        )

    def _identity(self) -> dict[str, Any]:
        """What must match for a resume to continue the same run."""
        return {
            "kind": self.method.kind,
            "name": self.method.name,
            "seed": self.loop.seed,
            "batch_size": self.loop.batch_size,
            "family": self.model.family.name,
        }

    def _restore(self, state: dict[str, Any], optimizer, scaler, sampler) -> int:
        identity = state.get("identity", {})
        if identity != self._identity():
            changed = sorted(k for k in self._identity() if identity.get(k) != self._identity()[k])
            raise UserError(
                f"cannot resume: the saved run differs in {', '.join(changed)}. Use the same settings, "
                "or start a new run in another folder."
            )
        self.method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        if self._class_sampler is not None and state.get("class_sampler") is not None:
            self._class_sampler.load_state_dict(state["class_sampler"])
        self.losses = [LossRecord(**r) for r in state["losses"]]
        self.validation = [(int(s), float(v)) for s, v in state.get("validation", [])]
        return int(state["step"])

    def _config_record(self, resumed: bool) -> dict[str, Any]:
        """config.json: the caller's record (loop, data, the model's title), the method's settings and
        the facts of the model trained on, added to (never replacing) what the caller said of it."""
        model = {
            **self.settings.get("model", {}),
            "family": self.model.family.name,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.model.device),
        }
        return {**self.settings, "method": self.method.describe(), "model": model, "resumed": resumed}

    def preview_prompt(self) -> str:
        prompt = self.loop.preview_prompt or self.dataset.template.lines[0].replace("[filewords]", "").strip(" ,")
        return prompt.replace("[name]", self.method.name)

    def _preview(self, step: int) -> None:
        size = self.loop.preview_size or self.dataset.config.size
        settings = SampleSettings(
            prompt=self.preview_prompt(),
            negative_prompt=self.loop.preview_negative,
            seed=self.loop.preview_seed,
            steps=self.loop.preview_steps,
            cfg_scale=self.loop.preview_cfg,
            width=size,
            height=size,
            sampler=self.loop.preview_sampler,
        )
        with torch.no_grad(), self._autocast(), self.method.apply_for_generation(self.model) as embeddings:
            side = SizeConditioning((size, size))
            cond = self._generation_conditioning([settings.prompt, settings.negative_prompt], embeddings, [side, side])
            with self._vae_back():
                image = generate(self.model, settings, embeddings, cond=cond)
        path = self.folder.preview(step)
        text = (
            f"{settings.prompt}\nNegative prompt: {settings.negative_prompt}\nSteps: {settings.steps}, "
            f"Sampler: {settings.sampler}, CFG scale: {settings.cfg_scale}, Seed: {settings.seed}, "
            f"Size: {size}x{size}, Training step: {step}"
        )
        self.folder.save_png(path, image, {"parameters": text})
        self._latest_preview = path

    def _report(
        self,
        phase: str,
        step: int,
        *,
        total: int | None = None,
        loss: float | None = None,
        lr: float | None = None,
        rate: RateMeter | None = None,
        message: str = "",
    ) -> None:
        total = self.total_steps if total is None else total
        self.on_progress(
            Progress(
                phase=phase,
                step=step,
                total=total,
                loss=None if loss is None or math.isnan(loss) else loss,
                lr=lr,
                steps_per_second=rate.rate() if rate else None,
                eta_seconds=rate.eta(total - step) if rate else None,
                preview=self._latest_preview,
                message=message,
            )
        )
