"""Choosing the fastest launch plan on the device itself (no CuPy here).

Which message kernel is fastest, whether fused iterations pay, and how many values a thread
should load at once (the load group) depends on the GPU and the batch's size. :func:`tune`
times each candidate plan of :func:`candidate_plans`, then the fastest at the other load
groups (:func:`load_group_plans`), on the inputs of the first call of a size class, and keeps
the fastest whose scores agree with the default plan's; :class:`TuningCache` keeps the choice
on disk, so that later processes on the same device skip the timing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from convcrf_cli.atomic import atomic_write_bytes
from convcrf_cli.backends import DeviceError
from convcrf_cli.backends.cuda_plan import (
    LOAD_GROUPS,
    MESSAGE_KERNELS,
    LaunchConfig,
    MeanFieldPlan,
    ModuleError,
)
from convcrf_cli.params import CRFParams, parse_json

TOLERANCE = 1e-3
"""Largest difference of a candidate's scores from the default plan's, relative to
``max(1, max |scores|)``; the variants differ only in float32 rounding, far below it."""
BUDGET_MS = 20.0
"""GPU time to spend timing each candidate (at least 3 runs, at most 15)."""
CACHE_ENTRIES = 512
"""Most choices the cache file keeps (the oldest are dropped)."""
CACHE_FILE = "cuda_tuning.json"


def variant_name(plan: MeanFieldPlan) -> str:
    """ "fused" or the message kernel of :data:`MESSAGE_KERNELS` the plan launches, with
    ":g<N>" where its load group (:data:`LOAD_GROUPS`) is not 1: "split:g8"."""
    name = "fused" if plan.fused else plan.message_kernel
    group = plan.config.load_group
    return name if group == 1 else f"{name}:g{group}"


def variant_config(config: LaunchConfig, name: str) -> LaunchConfig:
    """``config`` set to launch variant ``name`` (of :func:`variant_name`)."""
    kernel, marker, group = name.partition(":g")
    if not marker:
        load_group = 1
    else:
        load_group = int(group) if group.isdigit() else 0  # 0: not a load group
    if kernel not in (*MESSAGE_KERNELS, "fused") or load_group not in LOAD_GROUPS:
        raise ValueError(f"unknown launch variant {name!r}")
    if kernel == "fused":
        return dataclasses.replace(config, fuse_message=True, load_group=load_group)
    return dataclasses.replace(
        config, message_kernel=kernel, fuse_message=False, load_group=load_group
    )


def is_variant(name: object) -> bool:
    """Whether ``name`` is a name :func:`variant_name` gives."""
    try:
        variant_config(LaunchConfig(), name)  # type: ignore[arg-type]
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def candidate_plans(
    image_shape: Sequence[int],
    logits_shape: Sequence[int],
    params: CRFParams,
    config: LaunchConfig,
    plan_for: Callable[..., MeanFieldPlan] = MeanFieldPlan.create,
) -> list[MeanFieldPlan]:
    """The distinct plans of ``config`` (first) and of every message kernel and fused
    iterations, for ``image [N,F,H,W]`` and ``logits [N,C,H,W]``; variants that do not fit
    this shape (their plans fall back to another kernel, or raise DeviceError) are left out.
    ``plan_for(image_shape, logits_shape, params, config)`` makes a plan (the backend passes
    its cached :meth:`MeanFieldPlan.create`)."""
    plans: dict[str, MeanFieldPlan] = {}
    group = "" if config.load_group == 1 else f":g{config.load_group}"
    names = [f"{name}{group}" for name in (*MESSAGE_KERNELS, "fused")]
    configs = [config] + [variant_config(config, name) for name in names]
    for index, candidate in enumerate(configs):
        try:
            plan = plan_for(tuple(image_shape), tuple(logits_shape), params, candidate)
        except DeviceError:
            if index == 0:
                raise
            continue
        plans.setdefault(variant_name(plan), plan)
    return list(plans.values())


def load_group_plans(
    plan: MeanFieldPlan, plan_for: Callable[..., MeanFieldPlan] = MeanFieldPlan.create
) -> list[MeanFieldPlan]:
    """``plan`` at each other load group of :data:`LOAD_GROUPS` (``plan_for`` as in
    :func:`candidate_plans`)."""
    image_shape = (plan.batch, plan.features, plan.height, plan.width)
    logits_shape = (plan.batch, plan.classes, plan.height, plan.width)
    configs = [
        dataclasses.replace(plan.config, load_group=group)
        for group in LOAD_GROUPS
        if group != plan.config.load_group
    ]
    return [plan_for(image_shape, logits_shape, plan.params, config) for config in configs]


@dataclasses.dataclass
class Tuning:
    """What :func:`tune` measured for one size class, or what the cache held for it."""

    case: str
    """The batch shape it was timed on and parameters, for people: ``"1x21x375x500 k=7 blur 4"``."""
    chosen: str
    times_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    """Median milliseconds of one inference per variant (empty when read from the cache)."""
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    """Why a variant was not considered: its scores differ, or it failed to compile or to
    launch."""
    from_cache: bool = False

    def describe(self) -> str:
        """One line: the choice and what it was chosen over."""
        if self.from_cache:
            return f"CUDA launch plan for {self.case}: {self.chosen} (tuned earlier, cached)"
        times = ", ".join(f"{name} {ms:.3f} ms" for name, ms in self.times_ms.items())
        text = f"CUDA launch plan for {self.case}: {self.chosen} (timed: {times})"
        for name, reason in self.rejected.items():
            text += f"; {name} left out: {reason}"
        return text


def describe_case(plan: MeanFieldPlan) -> str:
    """:attr:`Tuning.case` of a plan."""
    shape = "x".join(str(v) for v in (plan.batch, plan.classes, plan.height, plan.width))
    return f"{shape} k={plan.params.filter_size} blur {plan.blur}"


def tune(
    plans: Sequence[MeanFieldPlan],
    measure: Callable[[MeanFieldPlan], tuple[float, Any]],
    difference: Callable[[Any, Any], float],
    refinements: Callable[[MeanFieldPlan], Sequence[MeanFieldPlan]] | None = None,
) -> tuple[MeanFieldPlan, Tuning]:
    """The fastest of ``plans`` and then of ``refinements(fastest)`` (the backend's: the
    fastest at the other load groups) whose scores agree with those of ``plans[0]`` (the
    default).

    ``measure(plan)`` runs the plan and returns (median milliseconds, scores);
    ``difference(scores, reference)`` is the largest difference relative to
    ``max(1, max |reference|)``. A candidate that raises, or differs by more than
    :data:`TOLERANCE`, is left out (its reason is in :attr:`Tuning.rejected`), as is one
    whose module does not compile (a :class:`ModuleError`); the default's own errors, and a
    candidate's other DeviceErrors (the device cannot go on), are raised.
    """
    reference_ms, reference = measure(plans[0])
    tuning = Tuning(describe_case(plans[0]), variant_name(plans[0]))
    tuning.times_ms[tuning.chosen] = reference_ms
    best, best_ms = plans[0], reference_ms

    def consider(plan: MeanFieldPlan) -> None:
        nonlocal best, best_ms
        name = variant_name(plan)
        try:
            ms, scores = measure(plan)
        except ModuleError as exc:  # its module does not compile or load: keep the default
            tuning.rejected[name] = exc.problem
            return
        except DeviceError:  # the device is unusable now: nothing more can run
            raise
        except Exception as exc:  # a launch the device refuses: keep the default
            tuning.rejected[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            return
        off_by = difference(scores, reference)
        del scores
        if not off_by <= TOLERANCE:
            tuning.rejected[name] = f"scores differ from {variant_name(plans[0])}'s by {off_by:.2e}"
            return
        tuning.times_ms[name] = ms
        if ms < best_ms:
            best, best_ms = plan, ms

    for plan in plans[1:]:
        consider(plan)
    for plan in refinements(best) if refinements is not None else ():
        consider(plan)
    tuning.chosen = variant_name(best)
    return best, tuning


def median_ms(timed_run: Callable[[], float]) -> float:
    """Median of ``timed_run()`` (milliseconds of one run) over as many runs as fit in
    :data:`BUDGET_MS`, at least 3 and at most 15, after one untimed run."""
    timed_run()
    first = timed_run()
    repeats = int(min(15, max(3, BUDGET_MS / max(first, 1e-3))))
    return statistics.median([first] + [timed_run() for _ in range(repeats - 1)])


def cache_directory() -> Path:
    """``$CONVCRF_CACHE_DIR``, else ``$XDG_CACHE_HOME/convcrf``, else ``~/.cache/convcrf``."""
    if os.environ.get("CONVCRF_CACHE_DIR"):
        return Path(os.environ["CONVCRF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convcrf"


def size_class(plan: MeanFieldPlan) -> int:
    """The batch's pixel count N·H·W on a scale of half octaves (``round(2·log2(N·H·W))``):
    batches within about a factor √2 of each other share a choice, so that a dataset of many
    image sizes is not timed once per size."""
    return round(2 * math.log2(plan.batch * plan.height * plan.width))


def cache_key(device: str, kernel_source: str, plan: MeanFieldPlan, base: LaunchConfig) -> str:
    """What a choice depends on: the device, the kernel source, the :func:`size_class`, the
    image channels and classes, the parameters and the launch configuration it was tuned from."""
    source = hashlib.sha256(kernel_source.encode()).hexdigest()[:16]
    shape = (size_class(plan), plan.features, plan.classes)
    return f"{device}|{source}|{shape}|{plan.params!r}|{base!r}"


class TuningCache:
    """Variant names by :func:`cache_key`, in the JSON file ``directory/cuda_tuning.json``.

    A file that cannot be read counts as empty, and an entry that is no variant name as
    absent; one that cannot be written is left as it is: the cache only saves time.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.path = (directory or cache_directory()) / CACHE_FILE

    def __len__(self) -> int:
        """The number of launch plans held: entries whose value is a variant name."""
        return len(self._load())

    def problem(self) -> str | None:
        """What makes the file unusable, in words ("is not valid JSON"), or that some of its
        entries are no launch plan; None when it is absent or every entry is a plan."""
        try:
            entries = self._read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        except ValueError:
            return "is not valid JSON"
        if not isinstance(entries, dict):
            return "holds no JSON object"
        invalid = sum(not is_variant(name) for name in entries.values())
        if not invalid:
            return None
        return f"holds entries that are no launch plan ({invalid} of {len(entries)}, ignored)"

    def get(self, key: str) -> str | None:
        """The variant cached for ``key``, None when there is none (or not a variant)."""
        name = self._load().get(key)
        return name if is_variant(name) else None

    def put(self, key: str, name: str) -> None:
        """Remember variant ``name`` for ``key`` as the newest entry, keeping the newest
        :data:`CACHE_ENTRIES`; written at once (a write that fails is ignored)."""
        entries = self._load()
        entries.pop(key, None)
        entries[key] = name
        kept = dict(list(entries.items())[-CACHE_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(kept, indent=1).encode())
        except OSError:
            pass

    def _read(self) -> object:
        """The file's JSON value; an OSError or ValueError as raised."""
        return parse_json(self.path.read_text())

    def _load(self) -> dict[str, str]:
        """The entries whose value is a variant name; none when the file is unusable."""
        try:
            entries = self._read()
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        return {key: name for key, name in entries.items() if is_variant(name)}
