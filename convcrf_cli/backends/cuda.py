"""CUDA backend: ConvCRF mean field as fused CuPy RawKernels from ``cuda/*.cu``.

One batch of N same-sized images is refined by one launch of each kernel:

* ``convcrf_pool_features``: image ``[N,F,H,W]`` -> coarse features ``[N,2+F,h,w]``;
* ``convcrf_init``: logits -> per-pixel log-sum-exp ``[N,H,W]`` and ``P = pool(Q0)`` ``[N,C,h,w]``;
* per iteration ``convcrf_message`` (``P`` -> coarse message ``M``), then ``convcrf_step``
  (``P = pool(softmax((u-w)·L + w·crop(up(M))))``) or, last, ``convcrf_final`` (the scores).

The launch logic is :mod:`convcrf_cli.backends.cuda_plan` and the choice among its variants
(message kernels, fused iterations, load groups) :mod:`convcrf_cli.backends.cuda_tune` (no
CuPy in either); this module compiles the kernels, loads them on a device, times the variants
at the first batch of each size class and launches the chosen plan with CuPy.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convcrf_cli.backends import Array, DeviceError, array_library
from convcrf_cli.backends.cuda_plan import (
    DEFAULT_SHARED_MEMORY,
    MAX_CLASS_BLOCK,
    MAX_SHARED_MEMORY,
    LaunchConfig,
    MeanFieldPlan,
    ModuleError,
    launch_slices,
    run_plan,
)
from convcrf_cli.backends.cuda_tune import (
    Tuning,
    TuningCache,
    cache_key,
    candidate_plans,
    describe_case,
    load_group_plans,
    median_ms,
    tune,
    variant_config,
    variant_name,
)
from convcrf_cli.params import CRFParams

KERNEL_FILES = ("features.cu", "message.cu", "fullres.cu", "fused.cu")
"""The kernel sources, compiled together as one module (package ``convcrf_cli.cuda``)."""

KERNEL_NAMES = (
    "convcrf_pool_features",
    "convcrf_init",
    "convcrf_message",
    "convcrf_message_split",
    "convcrf_message_tiled",
    "convcrf_step",
    "convcrf_final",
    "convcrf_step_fused",
    # the differentiable mean field of convcrf_cli.torch on the GPU (launched by cuda_autograd.py)
    "convcrf_window_sum",
    "convcrf_window_products",
    "convcrf_upsample_adjoint",
    "convcrf_softmax_adjoint",
    "convcrf_unary_adjoint",
)


@functools.cache
def kernel_source() -> str:
    """The ``.cu`` sources, concatenated (read from the installed package ``convcrf_cli.cuda``)."""
    root = importlib.resources.files("convcrf_cli.cuda")
    return "\n".join((root / name).read_text() for name in KERNEL_FILES)


def compile_options(class_block: int, load_group: int = 1) -> tuple[str, ...]:
    """NVRTC options of the module with ``class_block`` classes per message chunk and
    ``load_group`` values per group of loads (:data:`cuda_plan.LOAD_GROUPS`)."""
    return (
        "-std=c++17",
        f"-DCONVCRF_CLASS_BLOCK={class_block}",
        f"-DCONVCRF_LOAD_GROUP={load_group}",
    )


def nvrtc_check(arch: str = "compute_80", class_block: int = 8) -> str | None:
    """Compile the kernels to PTX with NVRTC (no device needed); None, or why it failed."""
    nvrtc, problem = _load_nvrtc()
    if nvrtc is None:
        return problem
    program = nvrtc.createProgram(kernel_source(), "convcrf.cu", [], [])
    try:
        nvrtc.compileProgram(program, [*compile_options(class_block), f"--gpu-architecture={arch}"])
        nvrtc.getPTX(program)
    except nvrtc.NVRTCError as exc:
        return f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(program)}"
    finally:
        nvrtc.destroyProgram(program)
    return None


def nvrtc_version() -> str:
    """``"major.minor"`` of the NVRTC library CuPy loads, or why it does not load."""
    nvrtc, problem = _load_nvrtc()
    if nvrtc is None:
        return f"unavailable: {problem}"
    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


def _load_nvrtc():
    """(CuPy's nvrtc module, None) when the NVRTC library loads, else (None, the reason)."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or a CUDA library that does not load
        return None, f"CuPy's NVRTC does not load: {_import_problem(exc)}"
    return nvrtc, None


def _import_problem(exc: BaseException) -> str:
    """One line saying why an import failed, with the fix when our ``cuda/`` shadows NVIDIA's."""
    lines = [line.strip() for line in str(exc).splitlines() if any(c.isalpha() for c in line)]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    shadow = getattr(sys.modules.get("cuda"), "__file__", None)
    if shadow and (Path(shadow).parent / KERNEL_FILES[0]).exists():
        remedy = "run from another directory or set PYTHONSAFEPATH=1"
        if not hasattr(sys.flags, "safe_path"):  # Python 3.10: PYTHONSAFEPATH is new in 3.11
            remedy = "run from another directory (PYTHONSAFEPATH=1 needs Python 3.11 or newer)"
        text += (
            f" (the kernel directory {Path(shadow).parent} hides NVIDIA's 'cuda' package because "
            f"Python runs from the repository root; {remedy})"
        )
    return text


def import_cupy() -> Any:
    """The ``cupy`` module, imported when first asked for, so that this module loads without
    CuPy. Raises what ``import cupy`` raises (ImportError where CuPy is missing);
    :func:`cuda_unavailable_reason` says in one line why CuPy cannot be used."""
    import cupy

    return cupy


@functools.cache
def cuda_unavailable_reason(index: int = 0) -> str | None:
    """None when device ``cuda:index`` can run the kernels, else a one-line reason."""
    try:
        cupy = import_cupy()
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "cupy":
            return "CuPy is not installed (pip install 'convcrf-cli[cuda13]' or '[cuda12]')"
        return f"CuPy does not import: {_import_problem(exc)}"
    except OSError as exc:  # CuPy makes its kernel cache directory (~/.cupy) as it imports
        return (
            f"CuPy does not import: {_import_problem(exc)} (set CUPY_CACHE_DIR to a writable "
            "directory)"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device ({exc})"
    if index >= count:
        return f"no device cuda:{index} ({count} CUDA device{'s' if count != 1 else ''} found)"
    try:
        _compiled_module(index, MAX_CLASS_BLOCK // 4)
    except ModuleError as exc:
        return exc.problem
    return None


_unbuilt_modules: dict[tuple[int, int, int], str] = {}
"""Why each module that did not compile or load failed (:attr:`ModuleError.problem`), by
device, class block and load group: a module is tried once per process."""


@functools.cache
def _compiled_module(device_index: int, class_block: int, load_group: int = 1):
    """The RawModule for one device, class block and load group, compiled once per process;
    ModuleError where it does not compile or load (not tried again in this process)."""
    key = (device_index, class_block, load_group)
    if key in _unbuilt_modules:
        raise ModuleError(_unbuilt_modules[key])
    cupy = import_cupy()
    options = compile_options(class_block, load_group)
    try:
        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(code=kernel_source(), options=options)
            module.compile()
    except Exception as exc:  # CuPy's CompileException (NVRTC), a CUDADriverError (loading)
        _unbuilt_modules[key] = problem = module_problem(options, exc)
        raise ModuleError(problem) from exc
    return module


def module_problem(options: Sequence[str], failure: Exception) -> str:
    """:attr:`ModuleError.problem` of the module compiled with ``options`` that raised
    ``failure``: its defines and the :func:`first_error_line` of the failure."""
    defines = " ".join(option for option in options if option.startswith("-D"))
    return f"the CUDA kernels do not compile or load with {defines}: {first_error_line(failure)}"


_LOG_SUMMARY = re.compile(r"\d+ errors? detected")
"""NVRTC's last line, counting the errors of the log."""
_SOURCE_POSITION = re.compile(r"^\S*\((\d+)\): ")
"""The source file and line of an NVRTC message (a temporary file CuPy names)."""


def first_error_line(failure: Exception) -> str:
    """The line of a compiler log or error message that says what failed: the first that names
    an error (NVRTC's count of them aside), else the first that is not blank, else the type of
    ``failure``; the file before a line number written ``line N``."""
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not _LOG_SUMMARY.match(line)]
    line = next(iter(errors + lines), type(failure).__name__)
    return _SOURCE_POSITION.sub(r"line \1: ", line)


@functools.cache
def _device_launch_config(index: int) -> LaunchConfig:
    """:meth:`CUDABackend.launch_config` of device ``cuda:index``, queried once per process
    (CuPy reads every device attribute on each ``Device.attributes``)."""
    attributes = import_cupy().cuda.Device(index).attributes
    optin = attributes.get("MaxSharedMemoryPerBlockOptin", DEFAULT_SHARED_MEMORY)
    return LaunchConfig(
        shared_memory=max(DEFAULT_SHARED_MEMORY, min(optin, MAX_SHARED_MEMORY)),
        tiled_min_blocks=2 * attributes.get("MultiProcessorCount", 0),
    )


@functools.lru_cache(maxsize=64)
def _cached_plan(image_shape, logits_shape, params: CRFParams, config: LaunchConfig):
    """:meth:`MeanFieldPlan.create`, once per batch shape and parameter set (its launch
    arguments are then computed once too: the host issues launches faster)."""
    return MeanFieldPlan.create(image_shape, logits_shape, params, config)


@functools.cache
def device_properties(index: int) -> dict[str, Any]:
    """CuPy's properties of device ``cuda:index`` with ``name`` as ``str``, queried once per
    process."""
    props = dict(import_cupy().cuda.runtime.getDeviceProperties(index))
    if isinstance(props["name"], bytes):
        props["name"] = props["name"].decode()
    return props


@functools.lru_cache(maxsize=64)
def _tuning_key(index: int, plan: MeanFieldPlan) -> str:
    """:func:`cache_key` of a default plan on device ``cuda:index`` (named with its compute
    capability)."""
    props = device_properties(index)
    device = f"{props['name']} sm_{props['major']}{props['minor']}"
    return cache_key(device, kernel_source(), plan, plan.config)


_tuned_variants: dict[str, str] = {}
"""The launch variant chosen per :func:`cache_key` in this process."""


def _variant_plan(default: MeanFieldPlan, name: str) -> MeanFieldPlan:
    """The plan of launch variant ``name`` for the shape and parameters of ``default``."""
    if name == variant_name(default):
        return default
    image_shape = (default.batch, default.features, default.height, default.width)
    logits_shape = (default.batch, default.classes, default.height, default.width)
    config = variant_config(default.config, name)
    return _cached_plan(image_shape, logits_shape, default.params, config)


class _CuPyLauncher:
    """``launch`` of :func:`run_plan` on a compiled RawModule (current device and stream)."""

    def __init__(self, module) -> None:
        self.module = module
        self.kernels: dict[str, Any] = {}
        self.shared_limits: dict[str, int] = {}  # opted-in dynamic shared memory per kernel

    def __call__(self, name: str, grid, block, args: tuple, shared_mem: int) -> None:
        kernel = self.kernels.get(name)
        if kernel is None:
            kernel = self.kernels[name] = self.module.get_function(name)
        if shared_mem > self.shared_limits.get(name, DEFAULT_SHARED_MEMORY):
            if kernel.max_dynamic_shared_size_bytes < shared_mem:
                kernel.max_dynamic_shared_size_bytes = shared_mem
            self.shared_limits[name] = shared_mem
        kernel(grid, block, args, shared_mem=shared_mem)


@functools.cache
def module_launcher(device_index: int, class_block: int, load_group: int = 1) -> _CuPyLauncher:
    """The launcher of :func:`_compiled_module`, made once (it keeps the kernel handles)."""
    return _CuPyLauncher(_compiled_module(device_index, class_block, load_group))


def plan_launcher(device_index: int, plan: MeanFieldPlan) -> _CuPyLauncher:
    """:func:`module_launcher` of the module ``plan`` launches."""
    return module_launcher(device_index, *plan.module)


def array_kind(array: Any) -> str:
    """The kind of array the result is returned as: numpy, cupy, torch-cuda or torch-cpu."""
    library = array_library(array)
    if library == "cupy":
        return "cupy"
    if library == "torch":
        return "torch-cuda" if array.is_cuda else "torch-cpu"
    return "numpy"


def torch_stream(cupy: Any, device_index: int) -> Any:
    """Torch's current stream on ``cuda:device_index`` as a CuPy stream, so that CuPy's work
    is ordered after the torch work that made its inputs."""
    import torch

    handle = torch.cuda.current_stream(device_index).cuda_stream
    return external_stream(cupy, handle, device_index)


def external_stream(cupy: Any, handle: int, device_index: int) -> Any:
    """The ``cudaStream_t`` ``handle`` of ``cuda:device_index``, made by another library, as a
    CuPy stream: through ``Stream.from_external`` and the CUDA stream protocol where CuPy has
    it (14 and later, which deprecate ``ExternalStream``), else ``ExternalStream``. The stream
    from the protocol does not know its device; callers enter the device first."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:
        return cupy.cuda.ExternalStream(handle, device_index)
    return from_external(_StreamHandle(handle))


class _StreamHandle:
    """A raw ``cudaStream_t`` in the CUDA stream protocol (``__cuda_stream__``, version 0)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.handle


class CUDABackend:
    """Runs the fused kernels on device ``cuda:index``. Inputs may be NumPy arrays, CuPy arrays or
    torch tensors (CUDA tensors are shared through DLPack, no host copy); the scores come back
    as the same kind as the logits."""

    name = "cuda"

    def __init__(self, index: int = 0, tune: bool = True) -> None:
        """``tune``: at the first batch of each size class, time the launch variants
        (:mod:`convcrf_cli.backends.cuda_tune`) and keep the fastest, remembered in this
        process and in the :class:`TuningCache`; else always the default launch plan."""
        self.index = index
        self.tune = tune
        self.cupy = import_cupy()
        self.tunings: list[Tuning] = []
        """What this backend chose (timed, or read from the cache), one per size class."""

    def describe(self) -> str:
        """One line for ``-v``: the device, its name and CuPy's version."""
        name = device_properties(self.index)["name"]
        return f"cuda:{self.index} ({name}, CuPy {self.cupy.__version__})"

    def launch_config(self) -> LaunchConfig:
        """The GPU configuration: shared memory up to the device's opt-in limit, at most 64 KiB;
        the tiled message kernel from two blocks per multiprocessor."""
        return _device_launch_config(self.index)

    def run(self, image: Array, logits: Array, params: CRFParams) -> Array:
        """``image [N,F,H,W]``, ``logits [N,C,H,W]`` (real dtypes) -> scores ``[N,C,H,W]
        float32``, in the kind of ``logits`` (a CuPy array, a torch tensor where the logits
        were, NumPy for NumPy); a batch larger than one launch takes several
        (:func:`launch_slices`)."""
        cupy = self.cupy
        kind = array_kind(logits)
        with cupy.cuda.Device(self.index):
            with self._stream(kind):
                image_d = self.to_device(image)
                logits_d = self.to_device(logits)
                scores = cupy.empty(logits_d.shape, dtype=cupy.float32)
                n, c = logits_d.shape[:2]
                config = self.launch_config()
                for part in launch_slices(n, c, params.filter_size):
                    image_p, logits_p, scores_p = image_d[part], logits_d[part], scores[part]
                    plan = _cached_plan(image_p.shape, logits_p.shape, params, config)
                    if self.tune:
                        plan = self._tuned_plan(plan, image_p, logits_p, scores_p)
                        if plan is None:  # tuning ran the default plan last: scores are in
                            continue
                    launcher = plan_launcher(self.index, plan)
                    run_plan(plan, image_p, logits_p, scores_p, launcher, cupy.empty)
        return self._like(scores, kind)

    def _tuned_plan(self, default: MeanFieldPlan, image, logits, scores):
        """The plan of the variant chosen for ``default``'s shape: remembered in this process,
        cached on disk (where its module builds), or timed now on these inputs; None when it
        was timed now and the default won (its scores are then in ``scores`` already)."""
        key = _tuning_key(self.index, default)
        name = _tuned_variants.get(key) or self._cached_variant(key, default)
        if name is None:
            best, tuning = self._time_variants(default, image, logits, scores)
            self.tunings.append(tuning)
            _tuned_variants[key] = tuning.chosen
            TuningCache().put(key, tuning.chosen)
            return None if best is default else best
        return _variant_plan(default, name)

    def _cached_variant(self, key: str, default: MeanFieldPlan) -> str | None:
        """The variant the :class:`TuningCache` holds for ``key``, now remembered in this
        process; None where it holds none, or one whose module does not compile or load (chosen
        with another kernel source or compiler: the variants are timed again)."""
        name = TuningCache().get(key)
        if name is None:
            return None
        try:
            plan_launcher(self.index, _variant_plan(default, name))
        except ModuleError:
            return None
        self.tunings.append(Tuning(describe_case(default), name, from_cache=True))
        _tuned_variants[key] = name
        return name

    def _time_variants(self, default: MeanFieldPlan, image, logits, scores):
        """:func:`tune` over the candidate plans on these inputs; the default plan writes
        ``scores`` (the output), every other candidate a buffer of its own."""
        cupy = self.cupy
        plans = candidate_plans(
            image.shape, logits.shape, default.params, default.config, plan_for=_cached_plan
        )

        def measure(plan: MeanFieldPlan):
            out = scores if plan is default else cupy.empty(logits.shape, dtype=cupy.float32)
            launcher = plan_launcher(self.index, plan)

            def timed_run() -> float:
                start, stop = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                run_plan(plan, image, logits, out, launcher, cupy.empty)
                stop.record()
                stop.synchronize()
                return cupy.cuda.get_elapsed_time(start, stop)

            try:
                return median_ms(timed_run), out
            except Exception as exc:
                if plan is not default:
                    self._check_device_after(variant_name(plan), exc)
                raise

        def difference(candidate, reference) -> float:
            scale = max(1.0, float(cupy.abs(reference).max()))
            return float(cupy.abs(candidate - reference).max()) / scale

        def other_groups(plan: MeanFieldPlan) -> list[MeanFieldPlan]:
            return load_group_plans(plan, plan_for=_cached_plan)

        return tune(plans, measure, difference, other_groups)

    def _check_device_after(self, variant: str, failure: Exception) -> None:
        """DeviceError when the device no longer works after launch variant ``variant``
        failed with ``failure`` (an error CUDA keeps, such as an illegal address): the
        process cannot go on, and the user can run again without tuning."""
        try:
            self.cupy.cuda.runtime.deviceSynchronize()
        except Exception as exc:
            raise DeviceError(
                f"the CUDA launch variant {variant} failed ({str(failure).splitlines()[0]}) "
                f"and left cuda:{self.index} unusable ({str(exc).splitlines()[0]}); run again "
                "with --no-tune (CUDABackend(tune=False)) and please report it"
            ) from failure

    def _stream(self, kind: str):
        """Torch's current stream for torch CUDA inputs (ordered after the work that made
        them), else CuPy's current stream."""
        if kind == "torch-cuda":
            return torch_stream(self.cupy, self.index)
        return self.cupy.cuda.get_current_stream()

    def class_argmax(self, array: Array) -> np.ndarray:
        """Labels ``[N,H,W] int32`` on the host: the argmax over classes (first on ties) of a
        device array ``[N,C,H,W]`` on this device, taken there (only the labels are copied)."""
        with self.cupy.cuda.Device(self.index):  # CuPy runs it on the current device
            return array.argmax(axis=1).astype(np.int32).get()

    def to_device(self, array: Array) -> Array:
        """C-contiguous float32 CuPy array on this device (no copy for one already), whatever
        device is current: CuPy allocates on the current one."""
        cupy = self.cupy
        kind = array_kind(array)
        if kind == "cupy":
            where = array.device.id
        elif kind == "torch-cuda":
            where = array.device.index
        if kind in ("cupy", "torch-cuda") and where != self.index:
            raise DeviceError(f"input is on cuda:{where}, not on cuda:{self.index}")
        with cupy.cuda.Device(self.index):
            if kind == "torch-cuda":
                array = cupy.from_dlpack(array.detach())
            elif kind == "torch-cpu":
                array = array.detach().numpy()
            return cupy.ascontiguousarray(cupy.asarray(array), dtype=cupy.float32)

    def _like(self, scores, kind: str):
        if kind == "cupy":
            return scores
        if kind == "torch-cuda":
            import torch

            return torch.from_dlpack(scores)
        host = scores.get()
        if kind == "torch-cpu":
            import torch

            return torch.from_numpy(host)
        return host
