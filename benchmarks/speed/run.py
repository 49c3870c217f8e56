"""Speed and memory of in-place GradPruner under DeepSpeed ZeRO and FSDP2, side by side in one run.

For each engine (ZeRO-1/2/3, FSDP2), on N gloo ranks (CPU) and a Llama model of >= 50M parameters:

* observed step / plain step (the observation window's overhead);
* step after the window (observe() still called, a no-op) / plain step;
* in-place prune + re-partition + first step, vs the restart pipeline the reference code needs
  (save a sharded checkpoint, consolidate it and prune offline in one process, save an HF checkpoint,
  relaunch the ranks with torchrun as a new job (interpreter, imports, process group), load, first step);
* post-prune step / dense step, next to the kept-parameter fraction;
* RSS after / before the prune (and the dense x kept-fraction target);
* collectives (count, bytes) issued by GradPruner during observation and during the prune.

Usage: python -m benchmarks.speed.run --engines zero1 zero2 zero3 fsdp2 --out docs/benchmarks/speed.json

On CUDA (``--device cuda --dtype bf16``): NCCL ranks, one GPU each (``--world`` <= GPUs), bf16 mixed
precision (DeepSpeed ``bf16``, FSDP2 ``MixedPrecisionPolicy``), step times synchronised, and the CUDA
memory allocated after / before the prune next to the RSS. ``benchmarks/speed/cuda.sh`` is the prepared
GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402 - after the thread settings above

from benchmarks.ranks import free_port, run_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def bootstrap_median_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of ``values`` (percentile method, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(values), (reps, len(values)), generator=g)
    meds = x[idx].median(dim=1).values.sort().values
    return float(meds[int(0.025 * reps)]), float(meds[int(0.975 * reps) - 1])


def model_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        tie_word_embeddings=True,
    )


def batch(args: argparse.Namespace, step: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * (step + 100) + rank)
    ids = torch.randint(0, args.vocab, (args.micro, args.seq), generator=g).to(args.device)
    return {"input_ids": ids, "labels": ids}


def sync(args: argparse.Namespace) -> None:
    """Wait for the GPU before a clock is read (CUDA kernels run asynchronously)."""
    if args.device == "cuda":
        torch.cuda.synchronize()


def ds_config(stage: int, bf16: bool = False) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 2e6,
            "allgather_bucket_size": 2e6,
            "stage3_prefetch_bucket_size": 2e6,
            "stage3_param_persistence_threshold": 1e4,
        },
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


class Runner:
    """One engine's training step, in-place prune and checkpoint for the benchmark."""

    def __init__(self, name: str, model: torch.nn.Module, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        if name == "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            model.to(args.device)
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            kw = {"mp_policy": mp} if args.dtype == "bf16" else {}
            for layer in model.model.layers:
                fully_shard(layer, **kw)
            fully_shard(model, **kw)
            self.module = model
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            import deepspeed

            self.cfg = ds_config(int(name[-1]), bf16=args.dtype == "bf16")
            self.cfg["train_micro_batch_size_per_gpu"] = args.micro
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            self.engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=self.cfg)
            self.module = self.engine.module

    def pruner(self, block: Any) -> Any:
        if self.name == "fsdp2":
            from gradpruner_ds.backends.fsdp2 import FSDP2Backend
            from gradpruner_ds.pruner import GradPruner

            return GradPruner(self.module, block, backend=FSDP2Backend(self.module))
        from gradpruner_ds.integrations.deepspeed import for_deepspeed

        return for_deepspeed(self.engine, self.cfg, config=block)

    def steps(self, first: int, n: int, rank: int, pruner: Any = None) -> list[float]:
        out = []
        for s in range(first, first + n):
            t0 = time.perf_counter()
            if self.name == "fsdp2":
                loss = self.module(**batch(self.args, s, rank)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
                if pruner is not None:
                    pruner.observe()
                self.opt.step()
                self.opt.zero_grad()
            else:
                loss = self.engine(**batch(self.args, s, rank)).loss
                self.engine.backward(loss)
                if pruner is not None:
                    pruner.observe()
                self.engine.step()
            sync(self.args)
            out.append(time.perf_counter() - t0)
        return out

    def prune(self, pruner: Any) -> None:
        if self.name == "fsdp2":
            self.opt, _ = pruner.maybe_prune(self.opt, None)
        else:
            self.engine, _ = pruner.maybe_prune(self.engine, None)
            self.module = self.engine.module

    def save_checkpoint(self, workdir: str) -> None:
        """The sharded checkpoint the restart pipeline starts from (each rank writes its shard)."""
        if self.name == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            dcp.save({"model": get_model_state_dict(self.module)}, checkpoint_id=str(Path(workdir) / "dcp"))
        else:
            self.engine.save_checkpoint(workdir, tag="dense")

    def kept_params(self) -> int:
        if self.name == "zero3":
            return sum(int(p.ds_numel) for p in self.module.parameters())
        return sum(p.numel() for p in self.module.parameters())  # a DTensor's numel is the global one


def gpu_bytes(args: argparse.Namespace) -> int:
    """CUDA memory held by tensors on this rank's GPU (0 on CPU)."""
    if args.device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_allocated())


def bench_rank(rank: int, world: int, name: str, args: argparse.Namespace, workdir: str) -> dict:
    from transformers import LlamaForCausalLM

    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.diagnostics import count_collectives, live_tensor_bytes, release_memory, rss_bytes

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(args))
    n_params = sum(p.numel() for p in model.parameters())
    run = Runner(name, model, args)
    n = args.steps
    run.steps(-args.warmup, args.warmup, rank)  # warm-up (lazy state, ZeRO-3's trace, first all-gathers)
    block = GradPrunerConfig.from_dict(
        {"window_steps": n, "prune_ratio": args.prune_ratio, "num_merge": args.num_merge, "progress_bar": False,
         "criterion": args.criterion}
    )  # fmt: skip
    pruner = run.pruner(block)
    obs_calls: list[tuple[str, int]] = []
    observe = pruner.observe

    obs_time: list[float] = []

    def counted_observe() -> None:  # GradPruner's own collectives only, not the engine's
        sync(args)
        t = time.perf_counter()
        with count_collectives() as calls:
            observe()
        sync(args)
        obs_time.append(time.perf_counter() - t)
        obs_calls.extend(calls)

    pruner.observe = counted_observe
    hook_time: list[float] = []
    for stat in pruner.statistics.values():  # instrumentation: time the bodies of the layer hooks too
        inner = getattr(stat, "_layer", None)
        if inner is None:
            continue

        def timed_hook(*a: Any, inner=inner) -> None:
            t = time.perf_counter()
            inner(*a)
            sync(args)
            hook_time.append(time.perf_counter() - t)

        stat._layer = timed_hook  # type: ignore[attr-defined]
    # plain and observed steps interleaved (plain = the same step with GradPruner paused: no hooks, no
    # observe()), so machine noise hits both alike; the ratio of each adjacent pair is kept
    plain: list[float] = []
    observed: list[float] = []
    for i in range(n):
        with pruner.paused():
            plain += run.steps(1 + 2 * i, 1, rank, pruner)
        observed += run.steps(2 + 2 * i, 1, rank, pruner)
    pair_ratios = sorted(o / p for o, p in zip(observed, plain, strict=True))
    if args.overhead_only:
        # observe() (a no-op in the paused steps) and the hook bodies (observed steps only), per observed step
        own = (sum(obs_time) + sum(hook_time)) / n
        lo, hi = bootstrap_median_ci(pair_ratios)
        return {
            "plain_step_s": statistics.median(plain),
            "observed_step_s": statistics.median(observed),
            "pair_ratio_median": statistics.median(pair_ratios),
            "pair_ratio_q1": pair_ratios[len(pair_ratios) // 4],
            "pair_ratio_q3": pair_ratios[(3 * len(pair_ratios)) // 4],
            "pair_ratio_median_ci95": [lo, hi],
            "own_code_s_per_step": own,
            "own_code_over_plain_step": own / statistics.median(plain),
            "observe_s_per_step": sum(obs_time) / n,
            "hooks_s_per_step": sum(hook_time) / n,
            "igia_collected": "igia" in pruner.statistics,
            "statistics": sorted(pruner.statistics),
        }
    release_memory()
    rss_before, live_before, gpu_before = rss_bytes(), live_tensor_bytes(), gpu_bytes(args)
    # restart pipeline, part 1: the checkpoint the reference workflow would need
    t0 = time.perf_counter()
    run.save_checkpoint(workdir)
    t_save = time.perf_counter() - t0
    # in-place prune + re-partition + first step
    t0 = time.perf_counter()
    with count_collectives() as prune_calls:
        run.prune(pruner)
    sync(args)
    t_prune = time.perf_counter() - t0
    first = run.steps(1 + 2 * n, 1, rank, pruner)[0]  # the interleaved phase used steps 1 .. 2n
    release_memory()
    rss_after, live_after, gpu_after = rss_bytes(), live_tensor_bytes(), gpu_bytes(args)
    post = run.steps(2 + 2 * n, n, rank, pruner)
    plan = pruner.plan.to_dict()
    return {
        "params_dense": n_params,
        "params_kept": run.kept_params(),
        "plain_step_s": statistics.median(plain),
        "observed_step_s": statistics.median(observed),
        "plain_step_min_s": min(plain),
        "observed_step_min_s": min(observed),
        "pair_ratio_median": statistics.median(pair_ratios),
        "pair_ratio_q1": pair_ratios[len(pair_ratios) // 4],
        "pair_ratio_q3": pair_ratios[(3 * len(pair_ratios)) // 4],
        "observe_call_s": statistics.median(obs_time[:n]),  # inside observe(); the rest is the forward hooks
        "hooks_per_step_s": sum(hook_time) / n,  # inside the activation hooks, per observed step
        "post_prune_step_s": statistics.median(post),
        "inplace_prune_s": t_prune,
        "first_step_after_prune_s": first,
        "save_checkpoint_s": t_save,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "live_tensor_bytes_before": live_before,
        "live_tensor_bytes_after": live_after,
        "cuda_allocated_before": gpu_before,
        "cuda_allocated_after": gpu_after,
        "observe_collectives": len(obs_calls),
        "observe_bytes": sum(b for _, b in obs_calls),
        "prune_collectives": len(prune_calls),
        "prune_bytes": sum(b for _, b in prune_calls),
        "removed": plan["dropped"] + plan["merged"],
        "targets": plan["targets"],
    }


def offline_prune(
    name: str, workdir: str, args: argparse.Namespace, removed: list[int], targets: list
) -> float:
    """The reference workflow's middle part, in one process: consolidate the sharded checkpoint, load
    the full model, cut the layers (merge included), write an HF checkpoint."""
    from transformers import LlamaForCausalLM

    from gradpruner_ds.surgery import remove_layers

    t0 = time.perf_counter()
    if name == "fsdp2":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        full = Path(workdir) / "full.pt"
        dcp_to_torch_save(str(Path(workdir) / "dcp"), str(full))
        sd = torch.load(full, weights_only=True)["model"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(workdir, tag="dense")
    model = LlamaForCausalLM(model_config(args))
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():  # the merge costs about the same offline; approximate with a masked add
        layers = model.model.layers
        for p, t in targets:
            for w_t, w_p in zip(layers[t].parameters(), layers[p].parameters(), strict=True):
                if w_t.dim() == 2:
                    w_t.add_(torch.where(torch.sign(w_t) == torch.sign(w_p), w_p, 0.0) * 0.2)
    remove_layers(model, removed)
    model.save_pretrained(Path(workdir) / "pruned_hf")
    return time.perf_counter() - t0


def relaunch(name: str, workdir: str, args: argparse.Namespace) -> float:
    """The reference workflow's last part, as a new job: ``torchrun`` starts fresh ranks that import the
    stack, join a process group, load the pruned checkpoint, wrap it and take one step. Wall time of
    the whole launch (no scheduler queue, which a cluster adds on top)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun) if torchrun.is_file() else "torchrun",
        "--nproc_per_node", str(args.world), "--master_port", str(free_port()),
        str(Path(__file__).with_name("relaunch.py")), "--engine", name, "--model_dir",
        str(Path(workdir) / "pruned_hf"), "--micro", str(args.micro), "--seq", str(args.seq),
        "--vocab", str(args.vocab), "--device", args.device, "--dtype", args.dtype,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=args.device)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"relaunch failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--engines",
        nargs="+",
        default=["zero1", "zero2", "zero3", "fsdp2"],
        choices=["zero1", "zero2", "zero3", "fsdp2"],
    )
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per phase (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the plain phase")
    ap.add_argument("--prune_ratio", type=float, default=0.375)
    ap.add_argument("--criterion", default="shortgpt_bi", help="the block's criterion (default: the default)")
    ap.add_argument("--num_merge", type=int, default=1, help="merged layers (> 0: IGIA is collected for masks)")
    ap.add_argument("--overhead_only", action="store_true",
                    help="only the interleaved plain / observed steps (no prune, no restart pipeline)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "speed.json")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NCCL ranks, one GPU each")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: mixed precision")
    args = ap.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gradpruner: --device cuda needs a CUDA GPU; none is visible (use --device cpu)")
        if args.world > torch.cuda.device_count():
            raise SystemExit(
                f"gradpruner: --world {args.world} needs one GPU per rank, {torch.cuda.device_count()} visible "
                f"(NCCL cannot put two ranks on one GPU); pass --world {torch.cuda.device_count()} or fewer"
            )
    os.environ["DS_ACCELERATOR"] = args.device  # before deepspeed is imported (ranks inherit it)
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401  (import once in the parent: forked ranks share it)

    backend = "nccl" if args.device == "cuda" else "gloo"

    results = {}
    wall0 = time.perf_counter()
    for name in args.engines:
        workdir = tempfile.mkdtemp(prefix=f"gp_speed_{name}_")
        try:
            ranks = run_ranks(bench_rank, args.world, name, args, workdir, timeout=1800, backend=backend)
            if args.overhead_only:  # per rank: the slowest rank's pairs decide the step
                results[name] = max(ranks, key=lambda x: x["pair_ratio_median"])
                continue
            r = {
                k: max(x[k] for x in ranks) if isinstance(ranks[0][k], float) else ranks[0][k]
                for k in ranks[0]
            }
            r["rss_before"] = statistics.mean(x["rss_before"] for x in ranks)
            r["rss_after"] = statistics.mean(x["rss_after"] for x in ranks)
            t_offline = offline_prune(name, workdir, args, r["removed"], r["targets"])
            t_relaunch = relaunch(name, workdir, args)
            restart = r["save_checkpoint_s"] + t_offline + t_relaunch
            inplace = r["inplace_prune_s"] + r["first_step_after_prune_s"]
            kept = r["params_kept"] / r["params_dense"]
            r.update(
                offline_prune_s=t_offline,
                relaunch_and_first_step_s=t_relaunch,
                restart_pipeline_s=restart,
                ratio_observed_over_plain=r["observed_step_s"] / r["plain_step_s"],
                ratio_observed_over_plain_min=r["observed_step_min_s"] / r["plain_step_min_s"],
                ratio_observe_call_over_plain=r["observe_call_s"] / r["plain_step_s"],
                ratio_hooks_over_plain=r["hooks_per_step_s"] / r["plain_step_s"],
                ratio_gradpruner_code_over_plain=(r["observe_call_s"] + r["hooks_per_step_s"])
                / r["plain_step_s"],
                ratio_inplace_over_restart=inplace / restart,
                ratio_post_over_dense=r["post_prune_step_s"] / r["plain_step_s"],
                kept_param_fraction=kept,
                ratio_rss_after_over_before=r["rss_after"] / r["rss_before"],
                ratio_tensor_bytes_after_over_before=r["live_tensor_bytes_after"]
                / r["live_tensor_bytes_before"],
            )
            if args.device == "cuda":
                r["ratio_cuda_allocated_after_over_before"] = (
                    r["cuda_allocated_after"] / r["cuda_allocated_before"]
                )
            results[name] = r
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(
        json.dumps({"args": meta, "results": results, "wall_s": time.perf_counter() - wall0}, indent=2)
    )
    if args.overhead_only:
        print("| engine | statistics | observed/plain step: median of interleaved pairs [q1, q3] (95% CI of "
              "the median) | GradPruner's own code / plain step (observe() + hooks) |")  # fmt: skip
        print("|---|---|---|---|")
        for name, r in results.items():
            lo, hi = r["pair_ratio_median_ci95"]
            print(f"| {name} | {', '.join(r['statistics']) or 'none'} | {r['pair_ratio_median']:.3f} "
                  f"[{r['pair_ratio_q1']:.3f}, {r['pair_ratio_q3']:.3f}] ({lo:.3f}-{hi:.3f}) "
                  f"| {r['own_code_over_plain_step']:.4f} |")  # fmt: skip
        print(f"wall time {time.perf_counter() - wall0:.0f} s; JSON: {args.out}")
        return
    print(
        "| engine | observed/plain step, medians; minima (observe() call + hooks) | post-prune/dense step (kept params) | in-place/restart | RSS after/before "
        "| tensor bytes after/before | GradPruner collectives: observe (count, MB) / prune + re-partition |"
        + (" CUDA allocated after/before |" if args.device == "cuda" else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if args.device == "cuda" else ""))
    for name, r in results.items():
        print(
            f"| {name} | {r['ratio_observed_over_plain']:.3f}; {r['ratio_observed_over_plain_min']:.3f} "
            f"({r['ratio_observe_call_over_plain']:.3f} "
            f"+ {r['ratio_hooks_over_plain']:.3f}) "
            f"| {r['ratio_post_over_dense']:.3f} "
            f"({r['kept_param_fraction']:.3f}) | {r['ratio_inplace_over_restart']:.3f} "
            f"({r['inplace_prune_s'] + r['first_step_after_prune_s']:.1f} s vs {r['restart_pipeline_s']:.1f} s) "
            f"| {r['ratio_rss_after_over_before']:.3f} | {r['ratio_tensor_bytes_after_over_before']:.3f} "
            f"| {r['observe_collectives']}, {r['observe_bytes'] / 1e6:.3f} / "
            f"{r['prune_collectives']}, {r['prune_bytes'] / 1e6:.1f} |"
            + (f" {r['ratio_cuda_allocated_after_over_before']:.3f} |" if args.device == "cuda" else "")
        )
    print(f"wall time {time.perf_counter() - wall0:.0f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
