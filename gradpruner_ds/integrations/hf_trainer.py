"""GradPruner inside a Hugging Face ``Trainer``: one process, DeepSpeed ZeRO-1/2/3, or FSDP2.

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    add_gradpruner(trainer, {"window_fraction": 0.01, "prune_ratio": 0.3})
    trainer.train()

Under a DeepSpeed config the block may also live in the DeepSpeed config (``"gradpruner": {...}``) and
``add_gradpruner(trainer)`` reads it from there. What happens in ``trainer.train()``:

* **Observation.** One process / FSDP2: ``on_pre_optimizer_step`` (after the Trainer's clipping, before
  the optimizer step; FSDP2's reduce-scatter has run, so every rank reads its own shard). DeepSpeed:
  the engine reduces, clips and steps inside ``accelerator.backward``, so the callback replaces
  accelerate's engine wrapper with one that observes between ``engine.backward`` and ``engine.step``
  (ZeRO's reduced shards, as in ``for_deepspeed``).
* **Prune** in ``on_step_end`` once the window is complete, in place: one process / FSDP2 keep the
  Trainer's optimizer and scheduler objects (kept parameters keep their state); DeepSpeed gets a new
  engine over the pruned module with fp32 masters, Adam moments, step, LR schedule and counters carried
  (``DeepSpeedBackend.rebuild``). The Trainer's loop holds the engine in a local variable, so the old
  engine object is turned into the new one (``DeepSpeedBackend.rebind``): every holder of it (the loop,
  ``trainer.model_wrapped``, ``trainer.deepspeed``, accelerate) trains the pruned model from the next step.
* **Recovery.** With a ``recovery`` block, :func:`add_gradpruner` wraps ``trainer.compute_loss`` so that the
  distillation term from the pre-prune teacher is added to the Trainer's loss for ``distill_steps`` steps
  (at the loss's own gradient-accumulation scale, :func:`distilled_loss`); a bare callback cannot.
* **Save.** With full fine-tuning the Trainer's own ``trainer.save_model()`` writes the pruned model (its
  config says so), so nothing else is written unless ``save_final=True``. With peft LoRA the Trainer saves
  adapters on the unpruned base; then (or when asked) the complete pruned model, adapters merged, goes to
  ``<output_dir>/gradpruner_final`` (:func:`gradpruner_ds.save_pretrained`: gathered one layer at a time
  under ZeRO-3 / FSDP2, rank 0 writes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from gradpruner_ds.arch import unwrap_model
from gradpruner_ds.backends import backend_for, forget_removed_units, is_ddp, is_fsdp2, teacher_for
from gradpruner_ds.checkpoint import (
    SUBDIR,
    begin_save,
    commit_checkpoint,
    complete,
    load_pruner_state,
    new_save_id,
    read_state,
    read_statistics,
    save_pruner_state,
    write_state_files,
)
from gradpruner_ds.config import GradPrunerConfig, load_config
from gradpruner_ds.consensus import wait_all
from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.errors import user_error
from gradpruner_ds.integrations.accelerate import observing_engine_wrapper
from gradpruner_ds.log import get_logger
from gradpruner_ds.peft_support import is_peft
from gradpruner_ds.pruner import GradPruner
from gradpruner_ds.recovery import Distiller
from gradpruner_ds.state_check import check_fields_present, check_plan_field
from gradpruner_ds.surgery import apply_surgery

log = get_logger("hf_trainer")

__all__ = ["GradPrunerCallback", "add_gradpruner"]


def _torch_optimizer(optimizer: Any) -> Any:
    """accelerate wraps the torch optimizer (AcceleratedOptimizer.optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


class GradPrunerCallback(TrainerCallback):
    """Observe, prune and keep training inside ``Trainer.train()``.

    ``config``: a ``GradPrunerConfig`` or its dict; None under DeepSpeed reads the ``"gradpruner"`` block
    of the Trainer's DeepSpeed config. ``trainer``: required under DeepSpeed (the callback must reach
    the accelerator and the engine); :func:`add_gradpruner` passes it.
    """

    def __init__(
        self,
        config: GradPrunerConfig | Mapping[str, Any] | None = None,
        *,
        trainer: Any = None,
        save_final: bool | None = None,
    ) -> None:
        if config is None or isinstance(config, GradPrunerConfig):
            self.config = config
        else:
            self.config = GradPrunerConfig.from_dict(config)
        self.trainer = trainer
        self.save_final = save_final
        self.pruner: GradPruner | None = None
        self.adds_distillation = False  # add_gradpruner wraps the Trainer's compute_loss
        self._deepspeed = False
        self._resume: tuple[Path, dict[str, Any]] | None = None  # (gradpruner folder, its state.json)
        self._resumed_plan: PrunePlan | None = None  # a resumed run that was pruned before its checkpoint
        self._resumed_state: dict[str, Any] | None = None
        self._resumed_distiller: Distiller | None = None  # resumed during the distillation after the prune
        self._base_written = False

    @property
    def plan(self) -> PrunePlan | None:
        """The run's plan (also when the run resumed from a checkpoint saved after the prune)."""
        return self.pruner.plan if self.pruner is not None else self._resumed_plan

    # ---- resume ----------------------------------------------------------------------------------
    def prepare_resume(self, checkpoint: str | Path, model: Any) -> None:
        """Before ``Trainer.train(resume_from_checkpoint=...)`` loads anything: read the checkpoint's GradPruner
        state; if the saved run was already pruned, replay the surgery on ``model`` now, so the Trainer loads the
        pruned weights and optimizer state into the pruned architecture (and the window is not run again).
        :func:`add_gradpruner` calls this from ``trainer.train``."""
        folder = Path(checkpoint) / SUBDIR
        if not complete(Path(checkpoint)):
            intact = sorted(
                (p for p in Path(checkpoint).parent.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if complete(p)),
                key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1,
            )
            raise user_error(
                "a Trainer checkpoint must be complete (every file written, then marked by GradPruner) to resume",
                f"{checkpoint} has no valid {SUBDIR}/complete.json",
                f"resume_from_checkpoint='{intact[-1]}' (the newest complete one)"
                if intact
                else "start over",
            )
        state = read_state(folder)
        where = str(folder / "state.json")
        check_fields_present(state, where)
        self._resume = (folder, state)
        self._resumed_state = state
        if state["plan"] is None and state.get("stages"):
            raise user_error(
                "the HF Trainer resumes a progressive run (stages > 1) only from a checkpoint saved before its first "
                "cut or after its last one",
                f"{checkpoint}: {len(state['stages'])} of the stages cut",
                "resume from another checkpoint, or use your own loop (GradPruner.load_state_dict + replay resume "
                "between stages)",
            )
        if state["plan"] is None or (self.config is not None and self.config.observe_only):
            return
        plan = check_plan_field(where, "plan", state["plan"])
        if self.config is not None and plan.config_digest != self.config.config_digest():
            raise user_error(
                "the gradpruner block must be the same as when the checkpoint was saved",
                f"{checkpoint}: config digest {plan.config_digest[:12]}, now {self.config.config_digest()[:12]}",
                "resume with the original gradpruner settings",
            )
        if getattr(unwrap_model(model).config, "gradpruner", None) is None:  # not replayed yet
            # saved while the distillation teacher lived: the teacher is the dense model's copy (made now,
            # before the surgery), its saved weights loaded into it
            self._resumed_distiller = self._resume_distiller(folder, model)
            apply_surgery(model, plan)
            forget_removed_units(model)  # FSDP2: the removed units' lazy-init bookkeeping
        self._resumed_plan = plan
        log.info(
            "resuming a pruned run from %s: layers %s removed before loading it",
            checkpoint,
            list(plan.removed),
        )

    def _resume_distiller(self, folder: Path, model: Any) -> Distiller | None:
        """The distillation teacher of a checkpoint saved during the recovery steps after the prune (its
        ``stats_rank<r>`` file holds this rank's teacher weights and the steps done), else None."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        path = folder / f"stats_rank{rank}.safetensors"
        if not path.exists():
            return None
        saved = read_statistics(path, (self._resumed_state or {}).get("save_id", "")).get("recovery")
        if saved is None:
            return None
        if self.config is None:  # a bare callback: its block is read from the DeepSpeed config later
            log.warning(
                "%s was saved during the recovery distillation, but this callback has no gradpruner block yet "
                "(it reads the DeepSpeed config's at train begin), so the teacher cannot be rebuilt before the "
                "surgery: the run goes on WITHOUT the remaining distillation steps. Use add_gradpruner(trainer) "
                "or GradPrunerCallback(config, ...) to resume them",
                folder.parent,
            )
            return None
        if self.config.recovery is None:  # the digest check would have caught a block
            return None
        distiller = Distiller(self.config.recovery, teacher_for(model, self.config.consensus_timeout_s))
        distiller.load_state_dict(saved)
        return distiller

    # ---- the distillation (add_gradpruner's compute_loss) ----------------------------------------------
    @property
    def distilling(self) -> bool:
        """True while the distillation teacher lives (after the prune, or resumed during its steps)."""
        if self.pruner is not None:
            return self.pruner.distilling
        return self._resumed_distiller is not None and self._resumed_distiller.active

    def distill(self, loss: torch.Tensor, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """``pruner.distill`` of the run, also when it resumed during the distillation."""
        if self.pruner is not None:
            return self.pruner.distill(loss, logits, batch)
        if self._resumed_distiller is None:
            return loss
        return self._resumed_distiller.loss(loss, logits, batch)

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """A callback passed in ``callbacks=[...]`` cannot see ``trainer.train(resume_from_checkpoint=...)``
        in time; ``TrainingArguments.resume_from_checkpoint`` (how the example scripts pass it) it can."""
        ckpt = getattr(args, "resume_from_checkpoint", None)
        if ckpt and self._resume is None and model is not None and (Path(ckpt) / SUBDIR).is_dir():
            self.prepare_resume(ckpt, model)

    def _restore(self) -> None:
        """At the start of a resumed run: the window's statistics and counts back into the new pruner."""
        if self._resume is None:
            return
        folder, _ = self._resume
        self._resume = None
        if self._resumed_plan is not None:  # pruned before the checkpoint: nothing is observed any more
            self.pruner = None
            return
        assert self.pruner is not None
        plan = load_pruner_state(self.pruner, folder)
        if plan is not None:
            raise user_error(
                "a checkpoint saved after the prune must be resumed through add_gradpruner (the surgery has to "
                "come before the Trainer loads the checkpoint's weights)",
                str(folder),
                "add GradPruner with add_gradpruner(trainer, config) instead of callbacks=[GradPrunerCallback(...)]",
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Every Trainer checkpoint carries GradPruner's state: ``checkpoint-<step>/gradpruner/``."""
        ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        folder = ckpt / SUBDIR
        rank = getattr(args, "process_index", 0)
        backend = self.pruner.backend if self.pruner is not None else None
        timeout = self.config.consensus_timeout_s if self.config is not None else 300.0

        def barrier() -> None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                wait_all(timeout, getattr(backend, "group", None), "the checkpoint commit")

        begin_save(ckpt, rank, barrier)  # the Trainer's files are written: GradPruner's of an earlier save go
        save_id = new_save_id(backend) if backend is not None else f"{state.global_step:016x}"
        if self.pruner is not None:
            save_pruner_state(self.pruner, folder, save_id)
        elif self._resumed_plan is not None:
            assert self._resumed_state is not None
            d = self._resumed_distiller
            stats = {"recovery": d.state_dict() if d is not None and d.active else None}
            write_state_files(folder, self._resumed_state, stats, rank, save_id)
        else:
            return
        # the marker binds every file of the checkpoint (the Trainer's and ours); resumes check it
        commit_checkpoint(ckpt.parent, ckpt.name, rank, barrier, latest=False, save_id=save_id)

    # ---- start -----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            self._begin_deepspeed(args, state)
            return
        if self.config is None:
            raise user_error(
                "GradPrunerCallback needs a config when the Trainer runs without DeepSpeed",
                None,
                'pass GradPrunerCallback({"prune_ratio": 0.3, ...}) or add_gradpruner(trainer, {...})',
            )
        wrapped = getattr(self.trainer, "model_wrapped", None)
        if wrapped is not None and is_ddp(
            wrapped
        ):  # the Trainer's DDP (several processes, no DeepSpeed/FSDP)
            model = wrapped
        if getattr(args, "world_size", 1) > 1 and not (is_ddp(model) or is_fsdp2(model)):
            raise user_error(
                "GradPrunerCallback on several processes needs the Trainer's engine: DDP, DeepSpeed ZeRO-1/2/3 or "
                "FSDP2 (fully_shard)",
                f"world_size {args.world_size}, a bare callback cannot see the Trainer's DDP wrapper",
                "use add_gradpruner(trainer, config) (it reaches trainer.model_wrapped), a DeepSpeed config, or an "
                "FSDP2-sharded model",
            )
        backend = backend_for(model)
        self.config = self._with_output_dir(self.config, args)
        self._check_distillation()
        if self._resumed_plan is None:
            self.pruner = GradPruner(model, self.config, total_steps=state.max_steps, backend=backend)
        self._restore()

    def _check_distillation(self) -> None:
        if self.config is not None and self.config.recovery is not None and not self.adds_distillation:
            log.warning(
                "the 'recovery' block asks for distillation after the prune, but a GradPrunerCallback passed in "
                "callbacks=[...] cannot add the term to the Trainer's loss: use add_gradpruner(trainer, config) "
                "instead (or call pruner.distill in your own compute_loss)"
            )

    def _begin_deepspeed(self, args: Any, state: Any) -> None:
        from gradpruner_ds.integrations.deepspeed import for_deepspeed

        trainer = self.trainer
        if trainer is None:
            raise user_error(
                "GradPrunerCallback under DeepSpeed needs the Trainer (to reach the engine and the accelerator)",
                "GradPrunerCallback(...) without trainer=",
                "add it with gradpruner_ds.integrations.hf_trainer.add_gradpruner(trainer, config)",
            )
        engine = trainer.model_wrapped
        ds_config = dict(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
        cfg = self.config if self.config is not None else load_config(ds_config)
        assert cfg is not None
        self.config = self._with_output_dir(cfg, args)
        self._check_distillation()
        self._deepspeed = True
        if self._resumed_plan is not None:
            self._restore()
            return
        self.pruner = for_deepspeed(engine, ds_config, total_steps=state.max_steps, config=self.config)
        trainer.accelerator.deepspeed_engine_wrapped = observing_engine_wrapper(engine, self.pruner)
        self._restore()

    @staticmethod
    def _with_output_dir(cfg: GradPrunerConfig, args: Any) -> GradPrunerConfig:
        # one progress display under the Trainer: its own bar (GradPruner logs the window's start and end)
        update: dict[str, Any] = {"progress_bar": False}
        if cfg.output_dir is None:
            update["output_dir"] = str(Path(args.output_dir) / "gradpruner")
        return cfg.model_copy(update=update)

    # ---- window and prune ------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pruner is not None and not self._deepspeed:
            self.pruner.observe()

    def on_step_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.pruner is None:
            if self._resumed_distiller is not None:  # resumed during the distillation: one more step done
                self._resumed_distiller.step_done()
            return
        if not self.pruner.cutting:  # a step of the window or the repair phase, or of the pruned model
            self.pruner.maybe_prune()
            return
        if not self._deepspeed:
            self.pruner.maybe_prune(_torch_optimizer(optimizer), lr_scheduler)
            self._log(state, control)
            return
        trainer = self.trainer
        old = trainer.model_wrapped
        # the scheduler DeepSpeed holds (the Trainer's, handed to deepspeed.initialize) is carried
        self.pruner.maybe_prune(old, None)
        backend: Any = self.pruner.backend  # a DeepSpeedBackend
        backend.rebind(old)  # the loop's engine object becomes the rebuilt engine
        trainer.optimizer.optimizer = old.optimizer  # accelerate's DeepSpeedOptimizerWrapper
        self._log(state, control)

    def _log(self, state: Any, control: Any) -> None:
        """The prune's events into the Trainer's log: ``trainer.log`` reaches every reporting integration
        (TensorBoard, W&B, ...) and ``log_history``; a callback without the Trainer adds them to
        ``log_history`` only."""
        assert self.pruner is not None
        events = self.pruner.events()
        if not events:
            return
        if self.trainer is not None:
            should_log = control.should_log  # trainer.log ends with on_log, which clears it: the step's own
            self.trainer.log(events)  # loss would then not be logged
            control.should_log = should_log
        else:
            state.log_history.append({**events, "step": state.global_step})

    # ---- end -------------------------------------------------------------------------------------
    def on_train_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.plan is None or (self.config is not None and self.config.observe_only):
            return
        save = self.save_final
        if save is None:  # by default only where the Trainer's own save is not the pruned model: peft runs
            save = unwrap_model(model) is not model and is_peft(model)
        if not save:
            return
        out = Path(args.output_dir) / "gradpruner_final"
        from gradpruner_ds.export import save_pretrained

        holder = self.trainer.model_wrapped if self._deepspeed and self.trainer is not None else model
        tokenizer = processing_class or getattr(self.trainer, "processing_class", None)
        save_pretrained(holder, out, tokenizer)
        log.info(
            "pruned model saved to %s (adapters merged%s)", out, ", tokenizer included" if tokenizer else ""
        )

    def point_adapters_at_pruned_base(self, folder: str | Path) -> None:
        """After the Trainer saved a peft model's adapters into ``folder`` (their ``base_model_name_or_path`` is
        the UNPRUNED base, which they would load onto with mismatched layers): the pruned base is written once to
        ``<output_dir>/gradpruner_base/`` (adapters not merged) and every ``adapter_config.json`` in ``folder``
        names it, so ``AutoPeftModelForCausalLM.from_pretrained(folder)`` loads the pruned model."""
        trainer = self.trainer
        if self.plan is None or trainer is None or not is_peft(trainer.model) or self.config is None:
            return
        if self.config.observe_only:
            return
        from gradpruner_ds.export import save_pretrained
        from gradpruner_ds.io import atomic_write_text

        base = (Path(trainer.args.output_dir) / "gradpruner_base").resolve()
        if not self._base_written:  # the base weights are frozen after the prune: written once
            holder = trainer.model_wrapped if self._deepspeed else trainer.model
            save_pretrained(holder, base, getattr(trainer, "processing_class", None), merge_lora=False)
            self._base_written = True
        if getattr(trainer.args, "process_index", 0) != 0:
            return
        for path in sorted(Path(folder).rglob("adapter_config.json")):
            data = json.loads(path.read_text())
            if data.get("base_model_name_or_path") != str(base):
                data["base_model_name_or_path"] = str(base)
                atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
                log.info("%s now names the pruned base %s", path, base)


def add_gradpruner(
    trainer: Any,
    config: GradPrunerConfig | Mapping[str, Any] | None = None,
    *,
    save_final: bool | None = None,
) -> GradPrunerCallback:
    """Add a :class:`GradPrunerCallback` bound to ``trainer`` (works for every engine); returns it.

    The block is validated now, before any training work: ``config``, or else the ``"gradpruner"``
    block of the Trainer's DeepSpeed config (``TrainingArguments.deepspeed``: a path or a dict)."""
    if config is None:
        ds = getattr(trainer.args, "deepspeed", None)
        if not ds:
            raise user_error(
                "add_gradpruner needs a config when the Trainer runs without DeepSpeed",
                None,
                'pass add_gradpruner(trainer, {"prune_ratio": 0.3, ...})',
            )
        config = load_config(ds)
    present = list(getattr(getattr(trainer, "callback_handler", None), "callbacks", []))
    if any(isinstance(c, GradPrunerCallback) for c in present):
        raise user_error(
            "a Trainer takes one GradPruner: this one already has a GradPrunerCallback (a second would prune the "
            "already pruned model again)",
            [type(c).__name__ for c in present],
            "call add_gradpruner(trainer, ...) once (and pass no GradPrunerCallback in callbacks=[...] beside it)",
        )
    cb = GradPrunerCallback(config, trainer=trainer, save_final=save_final)
    trainer.add_callback(cb)
    train = trainer.train

    def train_with_resume(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``trainer.train`` that first replays a checkpoint's prune (see ``prepare_resume``)."""
        if resume_from_checkpoint:
            if resume_from_checkpoint is True:
                from transformers.trainer_utils import get_last_checkpoint

                resume_from_checkpoint = get_last_checkpoint(trainer.args.output_dir)
            if resume_from_checkpoint is not None:
                cb.prepare_resume(resume_from_checkpoint, trainer.model)
        return train(resume_from_checkpoint, *args, **kwargs)

    trainer.train = train_with_resume
    save_model = trainer.save_model

    def save_model_naming_the_pruned_base(
        output_dir: str | None = None, _internal_call: bool = False
    ) -> None:
        """``trainer.save_model``; a pruned peft model's saved adapters then name the pruned base."""
        save_model(output_dir, _internal_call)
        cb.point_adapters_at_pruned_base(output_dir or trainer.args.output_dir)

    trainer.save_model = save_model_naming_the_pruned_base
    if cb.config is None or cb.config.recovery is not None:  # None: the DeepSpeed block, read at train begin
        compute_loss = trainer.compute_loss

        def compute_loss_with_distillation(
            model: Any, inputs: Any, return_outputs: bool = False, **kw: Any
        ) -> Any:
            """``Trainer.compute_loss`` plus, for ``recovery.distill_steps`` steps after the prune, the
            self-distillation term (:func:`distilled_loss`)."""
            if not cb.distilling or not torch.is_grad_enabled():
                return compute_loss(model, inputs, return_outputs=return_outputs, **kw)
            batch = dict(inputs)  # compute_loss may pop "labels" from inputs
            loss, outputs = compute_loss(model, inputs, return_outputs=True, **kw)
            loss = distilled_loss(cb, loss, outputs, batch)
            return (loss, outputs) if return_outputs else loss

        trainer.compute_loss = compute_loss_with_distillation
        cb.adds_distillation = True
        custom = [
            what
            for what, on in (
                ("label smoothing (label_smoothing_factor)", getattr(trainer, "label_smoother", None)),
                ("a custom compute_loss_func", getattr(trainer, "compute_loss_func", None)),
            )
            if on is not None
        ]
        if custom:
            log.warning(
                "the Trainer computes its loss with %s: the distillation term's gradient-accumulation scale is "
                "read off that loss as loss / (the micro-batch's mean cross-entropy), which is exact only for the "
                "plain cross-entropy loss; here the term's weight is off by the ratio of the two losses",
                " and ".join(custom),
            )
    return cb


def distilled_loss(pruner: Any, loss: Any, outputs: Any, batch: Mapping[str, Any]) -> Any:
    """The Trainer's micro-batch ``loss`` with the distillation term added at the same scale (``pruner``: a
    :class:`GradPruner` or the callback, anything with ``distill(loss, logits, batch)``).

    The Trainer's loss may be scaled for gradient accumulation and data parallelism (a token sum over the
    whole accumulated, all-rank batch times the number of processes) or be this micro-batch's mean; the
    distillation term is a mean over this micro-batch's trained positions. The scale is read off the loss
    itself: ``factor = loss / (this micro-batch's mean cross-entropy)`` (1 when the loss is a per-batch mean),
    and ``factor * pruner.distill(loss / factor, ...)`` adds ``weight * T^2 * KL * factor`` -- the term at the
    loss's own scale, as ``pruner.distill(out.loss, ...) / gradient_accumulation`` in a loop of one's own."""
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[1]
    labels = batch.get("labels")
    factor = torch.ones((), dtype=torch.float32)
    if labels is not None:
        with torch.no_grad():
            mean_ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
            if torch.isfinite(mean_ce) and mean_ce > 0:
                factor = loss.detach().float() / mean_ce
    factor = factor.to(loss.device)
    return pruner.distill(loss / factor, logits, batch) * factor
