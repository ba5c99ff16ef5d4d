"""Launch plan of the CUDA kernels (:class:`MeanFieldPlan`, :func:`run_plan`): block shapes,
grids, shared memory and arguments of every launch for one batch shape and parameter set.

Nothing here depends on CuPy: :mod:`convcrf_cli.backends.cuda` launches the plan on a GPU, and
the tests run it with NumPy arrays through a C++ shim that executes the same ``.cu`` kernels on
the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from convcrf_cli.backends import Array, DeviceError
from convcrf_cli.grid import coarse_size, pool_padding
from convcrf_cli.params import CRFParams

DEFAULT_SHARED_MEMORY = 48 * 1024
"""Dynamic shared memory every CUDA device grants a block without opting in (bytes)."""
MAX_SHARED_MEMORY = 64 * 1024
"""Most shared memory a block is given where the device allows more (bytes)."""
MAX_CLASS_BLOCK = 16
"""Most classes one message thread accumulates in registers (on an H100, 21 classes run
faster as two chunks of 11 than as one: twice the blocks; bench/gpu_tune.py)."""
MESSAGE_KERNELS = ("per-cell", "split", "tiled")
"""The message kernels: ``convcrf_message`` (one thread per cell), ``convcrf_message_split``
(the window rows of a cell over several threads) and ``convcrf_message_tiled`` (4 cells per
thread); ``cuda/message.cu`` describes them."""
MAX_BLOCK_THREADS = 1024
MAX_BLOCK_Z = 64
"""Most threads a CUDA block may have in all, and along z."""
MAX_GRID_YZ = 65535
"""Most blocks a CUDA grid may have along y and along z."""
TILE_CELLS = 4
"""Cells of a row each thread of ``convcrf_message_tiled`` computes (``CONVCRF_TILE_CELLS``)."""
LOAD_GROUPS = (1, 4, 8)
"""Values a thread loads before it uses or stores any (``CONVCRF_LOAD_GROUP``): the scores of
that many classes of a pixel in the full-resolution passes, that many values of the tile the
message kernels stage. 1 is the kernels as first measured; more loads in flight per thread,
but more registers."""
MAX_TILED_FEATURES = 6
"""Most feature channels (2 positions + the image channels) ``convcrf_message_tiled`` holds in
registers (``CONVCRF_MAX_FEATURES`` in ``cuda/message.cu``); more take ``convcrf_message``."""


class ModuleError(DeviceError):
    """The module a plan launches (:attr:`MeanFieldPlan.module`) does not compile or load on
    the device: NVRTC or the driver rejects its options. ``problem`` says so in one line; the
    message adds what to do where no other plan can run."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"{problem}; use --device cpu")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Block shapes and the shared-memory budget of the launches.

    cell_block: (x, y) coarse cells per block of the feature kernel and of the message kernel
        with one thread per cell.
    message_kernel: one of :data:`MESSAGE_KERNELS`, or "auto": "tiled" where its grid has at
        least ``tiled_min_blocks`` blocks (the backend asks for two per multiprocessor), else
        "per-cell" (on small grids one thread per cell gives the device more threads; the
        fastest at 500×375 on an H100 before "split" existed).
    split_cells: (x, y) cells per block of the split message kernel; each cell's window rows
        are shared by min(k, 1024 / (x·y), 64) threads (64: the largest block z).
    message_threads: (x, y) threads per block of the register-tiled message kernel, each
        computing :data:`TILE_CELLS` cells of a row; x is 4, 8, 16 or 32.
    tiled_min_blocks: see ``message_kernel``.
    fuse_message: at blur > 1, each iteration as one ``convcrf_step_fused`` launch (the
        message computed on each init/step block's cells and their neighbours in shared
        memory) instead of a message and a step launch; off until a device shows it faster.
    pixel_block: (x, y) pixels per block of the final pass.
    pool_threads: threads per block of the init/step passes.
    pool_box_width, pool_box_pixels: target width and size (pixels) of the box of pixels one
        init/step block pools at blur > 1 (whole coarse cells, so it may be larger).
    shared_memory: dynamic shared memory a block may use (bytes).
    load_group: one of :data:`LOAD_GROUPS`, compiled into the module the plan launches.
    """

    cell_block: tuple[int, int] = (16, 16)
    message_kernel: str = "auto"
    split_cells: tuple[int, int] = (8, 8)
    message_threads: tuple[int, int] = (8, 8)
    tiled_min_blocks: int = 0
    fuse_message: bool = False
    pixel_block: tuple[int, int] = (32, 8)
    pool_threads: int = 256
    pool_box_width: int = 32
    pool_box_pixels: int = 256  # fastest on an H100 at 500×375 (bench/gpu_tune.py)
    shared_memory: int = DEFAULT_SHARED_MEMORY
    load_group: int = 1


def class_block_for(
    num_classes: int,
    num_features: int,
    filter_size: int,
    config: LaunchConfig,
    kernel: str = "per-cell",
) -> int:
    """Classes per message chunk (the compile-time ``CONVCRF_CLASS_BLOCK``).

    As many as fit in the shared memory of message kernel ``kernel`` next to the features of a
    tile with its halo, at most :data:`MAX_CLASS_BLOCK`, balanced over the chunks (21 classes in
    two chunks: 11).
    """
    fit = _message_fit(num_features, filter_size, config, kernel)
    if fit < 1:
        raise DeviceError(
            f"filter size {filter_size} with {num_features} image channels needs more shared "
            f"memory than {config.shared_memory} bytes per block; use --device cpu"
        )
    return balanced_class_block(num_classes, min(fit, MAX_CLASS_BLOCK))


def balanced_class_block(num_classes: int, most: int = MAX_CLASS_BLOCK) -> int:
    """Classes per chunk when ``num_classes`` are split into as few chunks of at most ``most``
    as possible, balanced (21 classes at most 16: two chunks of 11)."""
    return math.ceil(num_classes / math.ceil(num_classes / most))


def _message_fit(num_features: int, filter_size: int, config: LaunchConfig, kernel: str) -> int:
    """Classes that fit in the message kernel's shared memory beside the features."""
    area = _message_tile_area(filter_size, config, kernel)
    words = config.shared_memory // 4 - (2 + num_features) * area
    per_class = area + _split_partial_floats(filter_size, config, kernel)
    return words // per_class


def _message_shared(
    num_features: int, class_block: int, filter_size: int, config: LaunchConfig, kernel: str
) -> int:
    """Bytes of dynamic shared memory of message kernel ``kernel``."""
    area = _message_tile_area(filter_size, config, kernel)
    partial = _split_partial_floats(filter_size, config, kernel)
    return 4 * ((2 + num_features + class_block) * area + class_block * partial)


def _message_tile_area(filter_size: int, config: LaunchConfig, kernel: str) -> int:
    """Floats per channel of the message kernel's shared tile (cells with the halo)."""
    span = filter_size // 2
    if kernel == "tiled":
        threads_x, threads_y = config.message_threads
        return 4 * row_quarter(threads_x, filter_size) * (threads_y + 2 * span)
    cells_x, cells_y = config.split_cells if kernel == "split" else config.cell_block
    return (cells_x + 2 * span) * (cells_y + 2 * span)


def _split_partial_floats(filter_size: int, config: LaunchConfig, kernel: str) -> int:
    """Floats per class of the split kernel's partial sums (0 for the other kernels)."""
    if kernel != "split":
        return 0
    return split_rows(filter_size, config) * math.prod(config.split_cells)


def split_rows(filter_size: int, config: LaunchConfig) -> int:
    """Threads that share the window rows of a cell in ``convcrf_message_split``."""
    per_cell = min(filter_size, MAX_BLOCK_Z, MAX_BLOCK_THREADS // math.prod(config.split_cells))
    return max(1, per_cell)


def row_quarter(threads_x: int, filter_size: int) -> int:
    """Words per quarter row of ``convcrf_message_tiled``'s shared tile.

    At least ``threads_x + (TILE_CELLS - 1 + 2s) // 4`` (thread x reads quarter-row words x to
    x + (TILE_CELLS - 1 + 2s) // 4), rounded up so that a row is ``threads_x`` or
    ``-threads_x`` banks away from the next: the rows of one warp then fall in different
    banks, and a warp's loads are conflict-free.
    """
    if threads_x not in (4, 8, 16, 32):
        raise ValueError(
            f"the tiled message kernel needs 4, 8, 16 or 32 threads in x, not {threads_x}"
        )
    quarter = threads_x + (TILE_CELLS - 1 + 2 * (filter_size // 2)) // 4
    while (4 * quarter) % 32 not in (threads_x % 32, -threads_x % 32):
        quarter += 1
    return quarter


def tiled_message_grid(
    batch: int, coarse_h: int, coarse_w: int, config: LaunchConfig
) -> tuple[int, int, int]:
    """(x, y, images) blocks of ``convcrf_message_tiled`` for one class chunk."""
    threads_x, threads_y = config.message_threads
    return (-(-coarse_w // (TILE_CELLS * threads_x)), -(-coarse_h // threads_y), batch)


def images_per_launch(classes: int, filter_size: int) -> int:
    """Most images one launch of every kernel takes: the message grids stack the class chunks
    of every image along z (at most ``classes``), the kernel-gradient grid its window rows
    (``filter_size``), and a grid has at most :data:`MAX_GRID_YZ` blocks there."""
    return MAX_GRID_YZ // max(classes, filter_size)


def launch_slices(batch: int, classes: int, filter_size: int) -> list[slice]:
    """The images of a batch in launches of at most :func:`images_per_launch` images."""
    step = images_per_launch(classes, filter_size)
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def message_kernel_for(
    batch: int, features: int, coarse_h: int, coarse_w: int, filter_size: int, config: LaunchConfig
) -> str:
    """The message kernel of :data:`MESSAGE_KERNELS` that ``config.message_kernel`` asks for
    ("auto": see :class:`LaunchConfig`), or "per-cell" where the one asked for does not fit:
    the tiled kernel holds at most :data:`MAX_TILED_FEATURES` features in registers, and
    either needs room for one class in shared memory."""
    kernel = config.message_kernel
    if kernel == "auto":
        blocks = math.prod(tiled_message_grid(batch, coarse_h, coarse_w, config))
        kernel = "tiled" if blocks >= config.tiled_min_blocks else "per-cell"
    if kernel not in MESSAGE_KERNELS:
        raise ValueError(f"message_kernel must be auto or one of {MESSAGE_KERNELS}, not {kernel}")
    if kernel == "tiled" and 2 + features > MAX_TILED_FEATURES:
        return "per-cell"
    if kernel != "per-cell" and _message_fit(features, filter_size, config, kernel) < 1:
        return "per-cell"
    return kernel


@dataclasses.dataclass(frozen=True)
class MeanFieldPlan:
    """Sizes, grids and shared memory of every launch for one batch shape and parameter set."""

    batch: int
    classes: int
    features: int
    height: int
    width: int
    params: CRFParams
    config: LaunchConfig
    class_block: int
    message_kernel: str = "per-cell"
    """Which of :data:`MESSAGE_KERNELS` computes the message."""

    @classmethod
    def create(
        cls,
        image_shape: Sequence[int],
        logits_shape: Sequence[int],
        params: CRFParams,
        config: LaunchConfig,
        class_block: int | None = None,
    ) -> MeanFieldPlan:
        """Plan for ``image [N,F,H,W]`` and ``logits [N,C,H,W]``; ``class_block`` defaults to
        :func:`class_block_for` (the shim passes the value it was compiled with). The message
        kernel is :func:`message_kernel_for`'s, or "per-cell" where ``class_block`` classes do
        not fit its shared memory."""
        if len(image_shape) != 4 or len(logits_shape) != 4:
            raise ValueError(
                f"expected image [N,F,H,W] and logits [N,C,H,W], got {tuple(image_shape)} "
                f"and {tuple(logits_shape)}"
            )
        n, f, height, width = (int(v) for v in image_shape)
        c = int(logits_shape[1])
        if (int(logits_shape[0]), *map(int, logits_shape[2:])) != (n, height, width):
            raise ValueError(f"image {tuple(image_shape)} and logits {tuple(logits_shape)} differ")
        if min(n, f, c, height, width) < 1:
            raise ValueError(
                f"empty input: image {tuple(image_shape)}, logits {tuple(logits_shape)}"
            )
        k, blur = params.filter_size, params.blur
        kernel = message_kernel_for(
            n, f, coarse_size(height, blur), coarse_size(width, blur), k, config
        )
        if class_block is None:
            class_block = class_block_for(c, f, k, config, kernel)
        elif _message_fit(f, k, config, kernel) < class_block:
            kernel = "per-cell"
        if config.load_group not in LOAD_GROUPS:
            raise ValueError(f"load_group must be one of {LOAD_GROUPS}, not {config.load_group}")
        plan = cls(n, c, f, height, width, params, config, class_block, kernel)
        if plan.message_shared > config.shared_memory:
            raise DeviceError(
                f"{class_block} classes per block with filter size {params.filter_size} need "
                f"{plan.message_shared} bytes of shared memory (limit {config.shared_memory})"
            )
        plan._check_pool_fit()
        plan._check_grids()
        return plan

    @classmethod
    def for_kernel(
        cls,
        logits_shape: Sequence[int],
        params: CRFParams,
        config: LaunchConfig,
        class_block: int,
    ) -> MeanFieldPlan:
        """Plan for the module's mean field (:mod:`convcrf_cli.backends.cuda_autograd`):
        ``logits [N,C,H,W]`` and a given kernel tensor, so no image features (``features``
        is 0) and no ``convcrf_message``; ``class_block`` as the module was compiled."""
        n, c, height, width = (int(v) for v in logits_shape)
        plan = cls(n, c, 0, height, width, params, config, class_block)
        plan._check_pool_fit()
        plan._check_grids()
        return plan

    def _check_grids(self) -> None:
        """DeviceError where a grid has more than :data:`MAX_GRID_YZ` blocks along y or z."""
        if self.batch > images_per_launch(self.classes, self.params.filter_size):
            raise DeviceError(
                f"{self.batch} images of {self.classes} classes exceed one launch of the CUDA "
                "kernels; refine them in smaller batches"
            )
        rows = max(self.cell_grid[1], self.pool_grid[1], self.pixel_grid[1])
        if rows > MAX_GRID_YZ:
            raise DeviceError(
                f"an image {self.height} pixels high exceeds the CUDA kernels' grids "
                f"({rows} blocks, at most {MAX_GRID_YZ}); use --device cpu"
            )

    def _check_pool_fit(self) -> None:
        if self.blur > 1 and self.chunk_classes < 1:
            raise DeviceError(
                f"blur {self.blur} is too large for the CUDA kernels ({self.pool_box} pixels "
                f"per block exceed {self.config.shared_memory} bytes of shared memory); "
                "use --device cpu"
            )

    @property
    def blur(self) -> int:
        """The pooling factor ``params.blur``."""
        return self.params.blur

    @property
    def module(self) -> tuple[int, int]:
        """``(CONVCRF_CLASS_BLOCK, CONVCRF_LOAD_GROUP)`` of the module the plan launches."""
        return (self.class_block, self.config.load_group)

    @functools.cached_property
    def coarse_h(self) -> int:
        """Rows of the coarse grid: ``ceil(height / blur)``."""
        return coarse_size(self.height, self.blur)

    @functools.cached_property
    def coarse_w(self) -> int:
        """Columns of the coarse grid: ``ceil(width / blur)``."""
        return coarse_size(self.width, self.blur)

    @functools.cached_property
    def pad_y(self) -> int:
        """Pooling padding of the rows (:func:`pool_padding` of the height)."""
        return pool_padding(self.height, self.blur)

    @functools.cached_property
    def pad_x(self) -> int:
        """Pooling padding of the columns (:func:`pool_padding` of the width)."""
        return pool_padding(self.width, self.blur)

    # -- message and feature kernels: one thread per coarse cell --------------------------
    @functools.cached_property
    def cell_grid(self) -> tuple[int, int, int]:
        """(x, y, images) blocks of :attr:`LaunchConfig.cell_block` coarse cells each."""
        bx, by = self.config.cell_block
        return (-(-self.coarse_w // bx), -(-self.coarse_h // by), self.batch)

    @functools.cached_property
    def num_chunks(self) -> int:
        """Chunks of :attr:`class_block` classes that cover the classes."""
        return -(-self.classes // self.class_block)

    @functools.cached_property
    def message_grid(self) -> tuple[int, int, int]:
        """:attr:`cell_grid` with every class chunk of every image along z."""
        gx, gy, _ = self.cell_grid
        return (gx, gy, self.batch * self.num_chunks)

    @functools.cached_property
    def message_shared(self) -> int:
        """Bytes of dynamic shared memory of the plan's message kernel."""
        k, kernel = self.params.filter_size, self.message_kernel
        return _message_shared(self.features, self.class_block, k, self.config, kernel)

    def message_launch(self, feat: Array, pooled: Array, message: Array) -> tuple:
        """``launch`` arguments of the message ``pooled [N,C,h,w]`` -> ``message [N,C,h,w]``
        with features ``feat [N,2+F,h,w]``: ``(name, grid, block, args, shared_mem)``."""
        p, i32, f32 = self.params, np.int32, np.float32
        args = (feat, pooled, message, i32(self.classes), i32(self.features))
        args += (i32(self.coarse_h), i32(self.coarse_w), i32(p.filter_size), i32(self.num_chunks))
        args += (f32(p.pos_compat), f32(p.col_compat), *self.inverse_scales)
        chunks = self.batch * self.num_chunks
        if self.message_kernel == "per-cell":
            block = (*self.config.cell_block, 1)
            return ("convcrf_message", self.message_grid, block, args, self.message_shared)
        if self.message_kernel == "split":
            cells_x, cells_y = self.config.split_cells
            grid = (-(-self.coarse_w // cells_x), -(-self.coarse_h // cells_y), chunks)
            block = (cells_x, cells_y, split_rows(p.filter_size, self.config))
            return ("convcrf_message_split", grid, block, args, self.message_shared)
        gx, gy, _ = tiled_message_grid(self.batch, self.coarse_h, self.coarse_w, self.config)
        args += (i32(row_quarter(self.config.message_threads[0], p.filter_size)),)
        block = (*self.config.message_threads, 1)
        return ("convcrf_message_tiled", (gx, gy, chunks), block, args, self.message_shared)

    # -- init/step: one block per tile of coarse cells -------------------------------------
    @functools.cached_property
    def pool_tile(self) -> tuple[int, int]:
        """(rows, cols) of coarse cells per block (of pixels at blur 1)."""
        b, cfg = self.blur, self.config
        if b == 1:
            return (max(1, cfg.pool_threads // cfg.pool_box_width), cfg.pool_box_width)
        cols = -(-cfg.pool_box_width // b)
        rows = max(1, round(cfg.pool_box_pixels / (cols * b * b)))
        if 4 * (2 + 1) * rows * cols * b * b > cfg.shared_memory:
            rows = cols = 1
        return (rows, cols)

    @functools.cached_property
    def pool_box(self) -> int:
        """Pixels one init/step block pools: :attr:`pool_tile` cells of ``blur²`` pixels."""
        rows, cols = self.pool_tile
        return rows * cols * self.blur * self.blur

    @functools.cached_property
    def chunk_classes(self) -> int:
        """Classes pooled per shared-memory round of the init/step passes; at blur 1, all of
        them when every pixel's scores fit in shared memory (kept there between the softmax
        statistics and Q), else 0 (the scores are computed twice)."""
        if self.blur == 1:
            fits = 4 * self.classes * self.pool_box <= self.config.shared_memory
            return self.classes if fits else 0
        return min(self.classes, self.config.shared_memory // (4 * self.pool_box) - 2)

    @functools.cached_property
    def pool_grid(self) -> tuple[int, int, int]:
        """(x, y, images) blocks of the init/step passes, one per :attr:`pool_tile`."""
        rows, cols = self.pool_tile
        return (-(-self.coarse_w // cols), -(-self.coarse_h // rows), self.batch)

    @functools.cached_property
    def pool_shared(self) -> int:
        """Bytes of dynamic shared memory of the init/step passes."""
        if self.blur == 1:
            return 4 * self.classes * self.pool_box if self.chunk_classes else 0
        return 4 * (2 + self.chunk_classes) * self.pool_box

    # -- convcrf_step_fused: message and step in one launch, on the init/step blocks --------
    @functools.cached_property
    def fused_layout(self) -> tuple[int, int] | None:
        """``(row_groups, chunk_classes)`` of ``convcrf_step_fused``: threads per window cell
        and class chunk that share its window rows (at most k), and classes pooled per round;
        None where the iterations are not fused (``config.fuse_message`` off, blur 1, or too
        little shared memory)."""
        if not self.config.fuse_message or self.blur == 1 or self.features == 0:
            return None
        win, area, padded = self._fused_sizes
        words = self.config.shared_memory // 4 - self.classes * win
        staged = (2 + self.features + padded) * area
        groups = min(self.params.filter_size, (words - staged) // (padded * win))
        chunk = min(self.classes, words // self.pool_box - 2)
        return (groups, chunk) if groups >= 1 and chunk >= 1 else None

    @property
    def fused(self) -> bool:
        """Whether the iterations run as ``convcrf_step_fused`` (see :attr:`fused_layout`)."""
        return self.fused_layout is not None

    @functools.cached_property
    def _fused_sizes(self) -> tuple[int, int, int]:
        """Cells of the message window, of the staged tile with its halo, and the classes padded
        to whole chunks."""
        rows, cols = self.pool_tile
        span = self.params.filter_size // 2
        padded = self.num_chunks * self.class_block
        return (rows + 2) * (cols + 2), (rows + 2 + 2 * span) * (cols + 2 + 2 * span), padded

    @functools.cached_property
    def fused_shared(self) -> int:
        """Bytes of dynamic shared memory of ``convcrf_step_fused`` (fused plans only)."""
        groups, chunk = self.fused_layout
        win, area, padded = self._fused_sizes
        staged = (2 + self.features + padded) * area + groups * padded * win
        return 4 * (self.classes * win + max(staged, (2 + chunk) * self.pool_box))

    def launch_fused(
        self,
        launch: Launch,
        logits: Array,
        lse: Array,
        feat: Array,
        pooled: Array,
        pooled_out: Array,
        scores: Array,
        last: bool,
    ) -> None:
        """``convcrf_step_fused``: ``pooled`` -> ``pooled_out`` or, ``last``, the scores."""
        p, i32, f32 = self.params, np.int32, np.float32
        rows, cols = self.pool_tile
        groups, chunk = self.fused_layout
        args = (logits, lse, feat, pooled, pooled_out, scores, i32(last), i32(self.classes))
        args += (i32(self.features), *self.geometry, i32(rows), i32(cols), i32(chunk))
        args += (i32(p.filter_size), i32(groups), f32(p.pos_compat), f32(p.col_compat))
        args += (*self.inverse_scales, *self.scales(p.weight))
        launch("convcrf_step_fused", self.pool_grid, self._pool_block, args, self.fused_shared)

    # -- final: one thread per pixel -------------------------------------------------------
    @functools.cached_property
    def pixel_grid(self) -> tuple[int, int, int]:
        """(x, y, images) blocks of :attr:`LaunchConfig.pixel_block` pixels each."""
        px, py = self.config.pixel_block
        return (-(-self.width // px), -(-self.height // py), self.batch)

    # -- the full-resolution launches, shared by inference and the module's mean field -----
    @functools.cached_property
    def geometry(self) -> tuple[np.int32, ...]:
        """``height, width, coarse_h, coarse_w, blur, pad_y, pad_x`` as kernel arguments."""
        values = (self.height, self.width, self.coarse_h, self.coarse_w, self.blur)
        return tuple(np.int32(v) for v in (*values, self.pad_y, self.pad_x))

    @property
    def inverse_scales(self) -> tuple[np.float32, np.float32]:
        """``1 / pos_sdims`` and ``1 / col_schan``: the message kernels scale the differences
        of the unscaled features by them."""
        return np.float32(1 / self.params.pos_sdims), np.float32(1 / self.params.col_schan)

    def scales(self, weight: float) -> tuple[np.float32, np.float32]:
        """``unary_scale = u - w`` and ``msg_scale = w`` for message weight ``weight``."""
        return np.float32(self.params.unary_weight - weight), np.float32(weight)

    def launch_init(self, launch: Launch, logits: Array, lse: Array, pooled: Array) -> None:
        """``convcrf_init``: logits -> ``lse [N,H,W]``, ``pooled`` Q0 ``[N,C,h,w]``."""
        rows, cols = self.pool_tile
        args = (logits, lse, pooled, np.int32(self.classes), *self.geometry)
        args += (np.int32(rows), np.int32(cols), np.int32(self.chunk_classes))
        args += (np.int32(self.params.init == "log"),)
        launch("convcrf_init", self.pool_grid, self._pool_block, args, self.pool_shared)

    def launch_step(
        self,
        launch: Launch,
        logits: Array,
        lse: Array,
        message: Array,
        pooled: Array,
        weight: float,
    ) -> None:
        """``convcrf_step``: the next pooled Q ``[N,C,h,w]`` from ``message [N,C,h,w]``."""
        rows, cols = self.pool_tile
        args = (logits, lse, message, pooled, np.int32(self.classes), *self.geometry)
        args += (np.int32(rows), np.int32(cols), np.int32(self.chunk_classes))
        args += self.scales(weight)
        launch("convcrf_step", self.pool_grid, self._pool_block, args, self.pool_shared)

    def launch_final(
        self,
        launch: Launch,
        logits: Array,
        lse: Array,
        message: Array,
        scores: Array,
        weight: float,
    ) -> None:
        """``convcrf_final``: the scores ``[N,C,H,W]`` from the last ``message``."""
        args = (logits, lse, message, scores, np.int32(self.classes), *self.geometry)
        args += self.scales(weight)
        launch("convcrf_final", self.pixel_grid, self.pixel_block, args, 0)

    @functools.cached_property
    def pixel_block(self) -> tuple[int, int, int]:
        """The block of the per-pixel passes: :attr:`LaunchConfig.pixel_block` by 1."""
        return (*self.config.pixel_block, 1)

    @functools.cached_property
    def _pool_block(self) -> tuple[int, int, int]:
        return (self.config.pool_threads, 1, 1)


Launch = Callable[[str, tuple[int, int, int], tuple[int, int, int], tuple, int], None]
"""``launch(kernel_name, grid, block, args, shared_mem_bytes)``."""


def run_plan(
    plan: MeanFieldPlan,
    image: Array,
    logits: Array,
    scores: Array,
    launch: Launch,
    empty: Callable[[tuple[int, ...], type], Array],
) -> None:
    """Launch the kernels of one batch.

    image ``[N,F,H,W]``, logits ``[N,C,H,W]``: C-contiguous float32 arrays of one library
    (CuPy on the GPU, NumPy in the shim); scores ``[N,C,H,W]`` float32 is written.
    ``empty(shape, dtype)`` allocates the intermediate buffers.
    """
    p, i32 = plan.params, np.int32
    n, c, f, h, w = plan.batch, plan.classes, plan.features, plan.coarse_h, plan.coarse_w
    feat = empty((n, 2 + f, h, w), np.float32)
    lse = empty((n, plan.height, plan.width), np.float32)
    pooled = empty((n, c, h, w), np.float32)
    message = empty((n, c, h, w), np.float32)
    cell_block = (*plan.config.cell_block, 1)
    features_args = (image, feat, i32(f), *plan.geometry)
    launch("convcrf_pool_features", plan.cell_grid, cell_block, features_args, 0)
    plan.launch_init(launch, logits, lse, pooled)
    if plan.fused:  # the message buffer holds the next pooled Q: P is read while it is written
        for i in range(p.iterations):
            last = i == p.iterations - 1
            plan.launch_fused(launch, logits, lse, feat, pooled, message, scores, last)
            pooled, message = message, pooled
        return
    message_launch = plan.message_launch(feat, pooled, message)
    for i in range(p.iterations):
        launch(*message_launch)
        if i < p.iterations - 1:
            plan.launch_step(launch, logits, lse, message, pooled, p.weight)
        else:
            plan.launch_final(launch, logits, lse, message, scores, p.weight)
