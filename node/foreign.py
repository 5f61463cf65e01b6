"""Honest training on *other kernels*: a child process that computes with another kernel build than this one
(:data:`node.device.FOREIGN_KERNELS`), to calibrate how far two machines with different CPU kinds or torch builds
drift apart on the same plan (:func:`node.crosscheck.tolerance_for` with ``foreign=True``).

Deterministic training gives the same bits only on the same kernels: a provider on another CPU (AVX-512 rather than
AVX2, ARM, another vendor's MKL path) computes other bits on the very same plan, and a referee that took a bit
mismatch there for fraud would slash it. Across builds the check is the one
across plans (a calibrated tolerance, then a bisection or loss scan down to one step), and its tolerance is measured
here: the provider's side of the calibration is trained in the child, replayed in this process.

``python -m node.foreign REQUEST OUT``: REQUEST is JSON. ``{"mode": "trajectories", "plan": label, "units":
[[spec_json, init_seed], ...]}``: OUT gets ``unit-N.safetensors`` (the state before every step, ``S/name``) and
``unit-N.json`` (losses, the build). ``{"mode": "units", "plan", "trainer", "units": [[spec_json, init_seed],
...]}``: whole units (honest, or one of :data:`node.adversary.ADVERSARIES`) trained into ``OUT/unit-N`` as a provider
would, each with ``unit.json`` (its proof, losses, the build) and ``reveals.safetensors``: every state it would
reveal in a dispute, re-derived from its own segment checkpoints (:class:`node.crosscheck.Revealer`) on those
kernels, for tests and ``bench proof``. ``{"mode": "replay", "plan", "units": [[spec_json, unit_dir], ...]}``: every
segment of those units replayed bit for bit on the child's kernels (a verifier and a referee pool on the provider's
own kernels), into ``OUT/replays.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from safetensors.torch import load_file, save_file
from torch import Tensor

from protocol.errors import GridMintValueError

Trajectory = tuple[list[dict[str, Tensor]], list[float]]


def foreign_env() -> dict[str, str]:
    """The environment of a child on other kernels than this process: the foreign set, or (if this process already
    runs it) the machine's own."""
    from node.device import FOREIGN_KERNELS

    env = dict(os.environ)
    if env.get("ATEN_CPU_CAPABILITY", "").lower() == FOREIGN_KERNELS["ATEN_CPU_CAPABILITY"]:
        for k in FOREIGN_KERNELS:
            env.pop(k, None)
    else:
        env.update(FOREIGN_KERNELS)
    return env


def _child(request: dict[str, Any], out: Path, timeout_s: float) -> None:
    """Run ``python -m node.foreign`` on other kernels for ``request``, writing into ``out``."""
    req = out / "request.json"
    req.write_text(json.dumps(request))
    root = str(Path(__file__).resolve().parents[1])
    env = foreign_env()
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    try:
        proc = subprocess.run([sys.executable, "-m", "node.foreign", str(req), str(out)], env=env, cwd=root,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise GridMintValueError(f"training on other kernels took over {timeout_s:g} s") from exc
    if proc.returncode != 0:
        raise GridMintValueError(f"training on other kernels failed (exit {proc.returncode}): "
                                 f"{proc.stderr.strip()[-600:]}")


def _not_ours(build: str) -> str:
    from node.device import kernel_build

    if build == kernel_build("cpu"):
        raise GridMintValueError(f"the child computed with this process's own kernels ({build}): no other kernels "
                                 f"to compare with")
    return build


def _unflatten(flat: Mapping[str, Tensor], n: int) -> list[dict[str, Tensor]]:
    states: list[dict[str, Tensor]] = [{} for _ in range(n)]
    for key, t in flat.items():
        step, _, name = key.partition("/")
        states[int(step)][name] = t
    return states


def train_units(units: Sequence[tuple[Any, int]], workdir: Path, plan: Any, trainer: str = "honest",
                timeout_s: float = 1800.0) -> tuple[list[tuple[Any, list[dict[str, Tensor]]]], str]:
    """Train units on other kernels, as a provider on another machine would: each ``(spec, init_seed)`` from fresh
    weights ``init_state(spec.model, init_seed)``, on ``plan`` (a CPU plan), honestly or as adversary ``trainer``,
    into ``workdir/unit-N``, all in one child. Returns, per unit, its :class:`~node.trainer.UnitResult` and the
    states it reveals in a dispute (before every step, re-derived on those kernels); and the child's kernel build."""
    from node.trainer import UnitResult, final_path, segment_path
    from protocol.proof import TrainingProof

    if plan.device != "cpu":
        raise GridMintValueError(f"other kernels are simulated on the CPU only, not on plan {plan.label!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _child({"mode": "units", "plan": plan.label, "trainer": trainer,
            "units": [[spec.to_json(), int(seed)] for spec, seed in units]}, workdir, timeout_s)
    out, build = [], ""
    for i, (spec, _) in enumerate(units):
        d = workdir / f"unit-{i}"
        meta = json.loads((d / "unit.json").read_text())
        states = _unflatten(load_file(str(d / "reveals.safetensors")), spec.steps + 1)
        final = load_file(str(final_path(d)))
        out.append((UnitResult(final_path(d), [segment_path(d, k) for k in range(spec.n_segments)],
                               TrainingProof.from_dict(meta["proof"]), [float(x) for x in meta["losses"]],
                               {k: v for k, v in final.items() if k.startswith("model.")}, 0.0), states))
        build = meta["build"]
    return out, _not_ours(build)


def train_unit(spec: Any, init_seed: int, workdir: Path, plan: Any, trainer: str = "honest",
               timeout_s: float = 600.0) -> tuple[Any, list[dict[str, Tensor]], str]:
    """:func:`train_units` for one unit: its result, the states it reveals, the child's kernel build."""
    [(result, states)], build = train_units([(spec, init_seed)], workdir, plan, trainer, timeout_s)
    return result, states, build


def replay_units(units: Sequence[tuple[Any, Path]], plan: Any, build: str,
                 timeout_s: float = 1800.0) -> list[list[dict[str, Any]]]:
    """Replay every segment of units trained by :func:`train_units` (each ``(spec, unit_dir)``) bit for bit in a
    child on the same other kernels (``build``: what they were trained with), as a verifier and a referee pool on
    the provider's kernels do (:func:`node.replay.check_segment`). Returns per unit, per segment, ``ok``, ``reason``
    and ``replayed_end``. Raises GridMintValueError if the child computes with other kernels than ``build``."""
    if plan.device != "cpu":
        raise GridMintValueError(f"other kernels are simulated on the CPU only, not on plan {plan.label!r}")
    with tempfile.TemporaryDirectory(prefix="gridmint-foreign-") as d:
        _child({"mode": "replay", "plan": plan.label,
                "units": [[spec.to_json(), str(Path(u).resolve())] for spec, u in units]}, Path(d), timeout_s)
        got = json.loads((Path(d) / "replays.json").read_text())
    if got["build"] != build:
        raise GridMintValueError(f"the replaying child computed with {got['build']}, the units with {build}")
    return list(got["units"])


def trajectories(units: Sequence[tuple[Any, int]], plan: Any, timeout_s: float = 600.0) -> tuple[list[Trajectory], str]:
    """Train each ``(spec, init_seed)`` (fresh weights ``init_state(spec.model, init_seed)``, fresh AdamW) on
    ``plan`` (a CPU plan) in a child on other kernels; returns the states before every step with the losses, and
    the child's kernel build. Raises GridMintValueError if the child fails or computes with this process's kernels."""
    if plan.device != "cpu":
        raise GridMintValueError(f"other kernels are simulated on the CPU only, not on plan {plan.label!r}")
    with tempfile.TemporaryDirectory(prefix="gridmint-foreign-") as d:
        _child({"mode": "trajectories", "plan": plan.label,
                "units": [[spec.to_json(), int(seed)] for spec, seed in units]}, Path(d), timeout_s)
        out: list[Trajectory] = []
        build = ""
        for i in range(len(units)):
            meta = json.loads((Path(d) / f"unit-{i}.json").read_text())
            states = _unflatten(load_file(str(Path(d) / f"unit-{i}.safetensors")), len(meta["losses"]) + 1)
            out.append((states, [float(x) for x in meta["losses"]]))
            build = meta["build"]
    return out, _not_ours(build)


def _flatten(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {f"{s}/{k}": v.contiguous() for s, st in enumerate(states) for k, v in st.items()}


def main(argv: Sequence[str]) -> int:
    from node import checkpoint
    from node.adversary import ADVERSARIES, trains_on_its_plan
    from node.crosscheck import PlanRunner, Revealer, trajectory
    from node.device import kernel_build
    from node.model import init_state
    from node.trainer import Plan, UnitSpec, fresh_state
    from node.trainer import train_unit as honest

    req = json.loads(Path(argv[0]).read_text())
    plan, out = Plan.parse(req["plan"]), Path(argv[1])
    if req.get("mode") == "units":
        train = honest if req["trainer"] == "honest" else ADVERSARIES[req["trainer"]]
        kw = {"plan": plan} if trains_on_its_plan(train) else {}  # a cheat may train its own way
        for i, (spec_json, seed) in enumerate(req["units"]):
            spec = UnitSpec.from_json(spec_json)
            d = out / f"unit-{i}"
            result = train(spec, init_state(spec.model, int(seed)), d, **kw)
            starts = {k: checkpoint.load(p)[0] for k, p in enumerate(result.segment_paths)}
            reveal = Revealer(spec, PlanRunner(spec, starts[0], plan), starts)
            save_file(_flatten([reveal(t) for t in range(spec.steps + 1)]), str(d / "reveals.safetensors"))
            (d / "unit.json").write_text(json.dumps({"proof": result.proof.to_dict(), "losses": result.losses,
                                                     "build": kernel_build("cpu")}))
        return 0
    if req.get("mode") == "replay":
        from node.replay import check_segment
        from node.trainer import segment_path
        from protocol.proof import TrainingProof

        replays = []
        for spec_json, unit_dir in req["units"]:
            spec, d = UnitSpec.from_json(spec_json), Path(unit_dir)
            proof = TrainingProof.from_dict(json.loads((d / "unit.json").read_text())["proof"])
            verdicts = [check_segment(spec, proof, s, segment_path(d, s), plan) for s in range(spec.n_segments)]
            replays.append([{"ok": v.ok, "reason": v.reason, "replayed_end": v.replayed_end} for v in verdicts])
        (out / "replays.json").write_text(json.dumps({"units": replays, "build": kernel_build("cpu")}))
        return 0
    for i, (spec_json, seed) in enumerate(req["units"]):
        spec = UnitSpec.from_json(spec_json)
        start = fresh_state(init_state(spec.model, int(seed)))
        states, losses = trajectory(PlanRunner(spec, start, plan), start, 0, spec.steps)
        save_file(_flatten(states), str(out / f"unit-{i}.safetensors"))
        (out / f"unit-{i}.json").write_text(json.dumps({"losses": losses, "build": kernel_build("cpu")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
