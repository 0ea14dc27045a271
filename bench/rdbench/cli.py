"""``python bench/run.py``: run the benchmark sections, print the table, write the JSON.

Sections (``--sections``, default all): 1 attacks vs torchattacks, 2 Ray Data attack stage vs a
plain loop, 3 Ray Train fixed cost and per-epoch time vs a plain loop, 4 UDDN / GNR training and
evaluation throughput, 5 the default run's stage breakdown (a subprocess of
``jobs/full_pipeline.py``; ``--skip-default-run`` leaves it out), 6 GPU bf16 / FLOP utilisation
(CUDA only). Sections 2 and 3 share one local Ray, started by the project and shut down before
section 5 starts its own. ``--quick`` runs every section smaller (fewer rounds, 80 px only, tiny
data, ``configs/smoke.yaml`` for section 5) as a check that the suite works, not for figures.

Exit status 0 when every section ran or was skipped for a stated reason, 1 when one failed
(its error is in the table and the JSON, its traceback on stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from .results import Section, format_table, machine_info, results_path, write_json

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TITLES = {
    "1": "attacks: ours vs torchattacks (same model, batch, eps, step sizes)",
    "2": "Ray Data attack stage vs a plain single-process loop",
    "3": "Ray Train: fixed cost of a fit, per-epoch time vs a plain PyTorch loop",
    "4": "UDDN / GNR training and evaluation throughput (plain PyTorch)",
    "5": "default run: wall time and stage breakdown",
    "6": "GPU: bf16 vs fp32, model FLOP utilisation",
}


@dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts of one suite run (:data:`FULL` or :data:`QUICK`)."""

    attack_sizes: tuple[int, ...] = (80, 160)
    attack_batch: int = 32  # attack.batch_size of the default run
    attack_rounds: int = 5
    attack_rounds_large: int = 3  # at 160 px a round of the four pairs takes ~1.5 min on 2 cores
    apgd_steps: int = 10
    # Config overrides for the Ray sections' data (none: the default run's 12 x 45 images at 80 px).
    ray_overrides: tuple[str, ...] = ()
    stage_split: str = "gnr"  # 120 images at the default size
    stage_methods: tuple[str, ...] = ("fgsm", "ifgsm4")  # the test methods: 5 gradient steps per image
    stage_rounds: int = 3
    stage_full_rounds: int = 2  # the default run's whole attack stage (0: leave it out)
    fixed_rounds: int = 5
    epochs: int = 4  # 3 timed epochs: the median drops the one that carries the first checkpoint
    epoch_rounds: int = 3
    checkpoint_rounds: int = 5
    checkpoint_steps: int = 10  # about one default-size epoch's worth of FaceNet steps
    throughput_steps: int = 5
    throughput_rounds: int = 5
    gpu_batch: int = 128
    gpu_steps: int = 10
    gpu_rounds: int = 5
    default_config: str = "configs/default.yaml"
    default_timeout_s: float = 3600.0


FULL = Settings()
QUICK = Settings(
    attack_sizes=(80,), attack_batch=8, attack_rounds=2, attack_rounds_large=2,
    ray_overrides=("data.num_identities=4", "data.images_per_identity=12", "data.splits.gnr=4",
                   "data.splits.denoise=4", "data.splits.val=2", "data.splits.test=2"),
    stage_rounds=2, stage_full_rounds=1, fixed_rounds=2, epochs=3, epoch_rounds=2,
    checkpoint_rounds=2, checkpoint_steps=2, throughput_steps=2, throughput_rounds=2,
    gpu_batch=32, gpu_steps=3, gpu_rounds=2,
    default_config="configs/smoke.yaml", default_timeout_s=1800.0,
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes: a check that it works")
    p.add_argument("--skip-default-run", action="store_true", help="leave out section 5 (the 8-9 minute default run)")
    p.add_argument("--sections", default="1,2,3,4,5,6", help="comma-separated section numbers (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every interleaved measurement (overrides the preset)")
    p.add_argument("--default-config", default=None, help="config of section 5's run (default: configs/default.yaml, "
                                                          "--quick: configs/smoke.yaml)")
    p.add_argument("--gpu-peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, TFLOP/s "
                                                                       "(default: from the device name)")
    p.add_argument("--device", default="cpu", help="torch device of sections 1 and 4 (e.g. cuda; default cpu). Section 6 "
                                                   "always uses cuda; sections 2, 3 and 5 place work as Ray does")
    p.add_argument("--out", default=None, help="results file (default: bench/results/<host>-<date>[-quick].json)")
    p.add_argument("--keep", action="store_true", help="keep section 5's run folder (its path is printed)")
    p.add_argument("--verbose", action="store_true", help="show the pipeline's own lines (stage and epoch progress)")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in TITLES]
    if unknown:
        p.error(f"--sections: unknown section(s) {unknown}; known: {', '.join(TITLES)}")
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA device (torch.cuda.is_available() is False)")
    args.chosen = [s for s in TITLES if s in chosen]
    return args


def settings_for(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else FULL
    if args.rounds is not None:
        s = dataclasses.replace(s, attack_rounds=args.rounds, attack_rounds_large=args.rounds, stage_rounds=args.rounds,
                                stage_full_rounds=args.rounds,
                                fixed_rounds=args.rounds,
                                epoch_rounds=args.rounds, checkpoint_rounds=args.rounds, throughput_rounds=args.rounds,
                                gpu_rounds=args.rounds)
    if args.default_config:
        s = dataclasses.replace(s, default_config=args.default_config)
    return s


def _run(section: Section, fn: Callable[[], None], log: Callable[[str], None]) -> None:
    """Run one section; a failure is recorded in the section (and its traceback printed)."""
    log(f"\n== {section.key}. {section.title}")
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # reported in the table and the JSON, and the exit status is 1
        traceback.print_exc()
        section.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
        log(f"  FAILED: {section.error}")
    section.seconds = time.perf_counter() - t0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from raydefense.cli import quiet_logs
    from raydefense.config import load_config

    quiet_logs()  # the project's console settings, RAY_TRAIN_V2_ENABLED=1 among them
    settings = settings_for(args)
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    def sub(line: str) -> None:
        if args.verbose:
            print(f"    | {line}", flush=True)

    base = load_config(os.path.join(REPO, "configs", "default.yaml"))
    num_classes = base.data.num_identities
    sections = {k: Section(k, TITLES[k]) for k in args.chosen}
    machine = machine_info()
    log(f"raydefense benchmark ({'quick' if args.quick else 'full'}) on {machine['host']}: {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']}, ray {machine['ray']}, GPU {machine['cuda'] or 'none'}")

    if "1" in sections:
        from .attacks import load_torchattacks, run_attacks

        theirs, why = load_torchattacks()
        if theirs is None:
            sections["1"].skipped = why
            log(f"\n== 1. {TITLES['1']}\n  skipped: {why}")
        else:
            _run(sections["1"], lambda: run_attacks(
                sections["1"], sizes=list(settings.attack_sizes), batch=settings.attack_batch,
                rounds=settings.attack_rounds, large_rounds=settings.attack_rounds_large,
                apgd_steps=settings.apgd_steps, num_classes=num_classes,
                theirs=theirs, device=args.device, log=log), log)
    if "4" in sections:
        from .throughput import run_throughput

        cfg4 = base.replace(list(settings.ray_overrides))
        _run(sections["4"], lambda: run_throughput(sections["4"], cfg4, num_classes=num_classes,
                                                   steps=settings.throughput_steps, rounds=settings.throughput_rounds,
                                                   device=args.device, log=log), log)
    if "6" in sections:
        from .gpu import run_gpu

        _run(sections["6"], lambda: run_gpu(sections["6"], base, num_classes=num_classes, batch=settings.gpu_batch,
                                            steps=settings.gpu_steps, rounds=settings.gpu_rounds,
                                            peak_override=args.gpu_peak_tflops, log=log), log)
    if "2" in sections or "3" in sections:
        _ray_sections(sections, base.replace(list(settings.ray_overrides)), settings, log=log, sub=sub)
    if "5" in sections:
        from .default_run import run_default

        if args.skip_default_run:
            sections["5"].skipped = "--skip-default-run"
            log(f"\n== 5. {TITLES['5']}\n  skipped: --skip-default-run")
        else:
            config = os.path.join(REPO, settings.default_config)
            _run(sections["5"], lambda: run_default(sections["5"], repo=REPO, config=config,
                                                    log_dir=os.path.join(REPO, "bench", "out"),
                                                    timeout_s=settings.default_timeout_s, keep=args.keep, log=log), log)

    ordered = [sections[k] for k in args.chosen]
    print("\n" + format_table(ordered), flush=True)
    out = args.out or results_path(os.path.join(REPO, "bench", "results"), host=machine["host"], when=started,
                                   quick=args.quick)
    write_json(out, sections=ordered, machine=machine, started=started, seconds=time.perf_counter() - t_start,
               args={k: v for k, v in vars(args).items() if k != "chosen"} | {"settings": dataclasses.asdict(settings)})
    log(f"results: {out}  ({time.perf_counter() - t_start:.0f} s)")
    return 1 if any(s.error for s in ordered) else 0


def _ray_sections(sections: dict[str, Section], cfg, settings: Settings, *, log: Callable[[str], None],
                  sub: Callable[[str], None]) -> None:
    """Sections 2 and 3 on one local Ray (started by the project, shut down at the end)."""
    import ray

    from .ray_stages import prepare_run, run_attack_stage, run_checkpoint, run_train

    with tempfile.TemporaryDirectory(prefix="raydefense-bench-") as root:
        try:
            from raydefense.pipeline.runtime import _running_local_cluster

            joined = os.environ.get("RAY_ADDRESS") or ("a `ray start` cluster on this machine"
                                                       if _running_local_cluster() else None)
            if joined:  # init_ray joins it rather than starting a local Ray: say so beside the figures
                log(f"  note: init_ray joins an existing cluster ({joined}); sections 2 and 3 share it with its other work")
            log("\n-- starting the project's local Ray and preparing the data (prepare stage)")
            t0 = time.perf_counter()
            try:
                ctx = prepare_run(cfg, root, log=sub)
            except Exception as exc:
                traceback.print_exc()
                for k in ("2", "3"):
                    if k in sections:
                        sections[k].error = f"setup (Ray start / prepare stage) failed: {type(exc).__name__}: {exc}"[:500]
                return
            resources = ray.cluster_resources()
            where = f"Ray {'joined: ' + str(joined) if joined else 'started by this process'}, " \
                    f"{resources.get('CPU', 0):g} logical CPUs"
            for k in ("2", "3"):
                if k in sections:
                    sections[k].notes.append(where)
            log(f"   ready in {time.perf_counter() - t0:.1f} s ({where})")
            if "2" in sections:
                def section_2() -> None:
                    from raydefense.pipeline.attack import attack_plan

                    run_attack_stage(sections["2"], ctx, rounds=settings.stage_rounds, log=log,
                                     plan={settings.stage_split: [("bench", "target", list(settings.stage_methods))]},
                                     label=f"Ray Data stage, '{settings.stage_split}' split")
                    if settings.stage_full_rounds:
                        # The whole stage: every pass is ~1 min at the default size, so no warm-up
                        # pass (the subset's passes warmed the same code and files).
                        run_attack_stage(sections["2"], ctx, rounds=settings.stage_full_rounds, warmup=0,
                                         plan=attack_plan(ctx.cfg), label="Ray Data stage, whole")

                _run(sections["2"], section_2, log)
            if "3" in sections:
                def section_3() -> None:
                    run_train(sections["3"], ctx, fixed_rounds=settings.fixed_rounds, epochs=settings.epochs,
                              rounds=settings.epoch_rounds, log=log)
                    run_checkpoint(sections["3"], ctx.cfg, rounds=settings.checkpoint_rounds,
                                   steps=settings.checkpoint_steps, log=log)

                _run(sections["3"], section_3, log)
        finally:
            if ray.is_initialized():
                ray.shutdown()
