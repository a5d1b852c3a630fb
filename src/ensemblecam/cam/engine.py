"""The CAM engine: one forward and one backward pass per batch for every gradient method.

:class:`CamEngine` owns the hook on the target layer, the target-class choice, the
upsampling and the normalisation; each method only supplies its weights
(:mod:`ensemblecam.cam.methods`, :mod:`ensemblecam.cam.scorecam`). Gradients are taken
with ``torch.autograd.grad`` of the summed target logits with respect to the hooked
activation only: the hook replaces the layer's output by a detached leaf, parameters do
not require gradients, so nothing below the target layer is recorded or differentiated.

Output convention: maps at the target layer -> ReLU -> (bi/tri)linear upsampling to the
input size (``align_corners=False``) -> per-image min-max to [0, 1] (a constant map gives
zeros). ``raw=True`` skips the min-max. Two options, in the engine so that every method
gets them: horizontal-flip test-time augmentation (``flip_tta``) and the fusion of several
target layers (``layer`` a list); :func:`ensemblecam.cam.methods.fuse` gives the order of
operations.
"""

from __future__ import annotations

import copy
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ensemblecam.cam import methods as M
from ensemblecam.cam.scorecam import ScoreStats, scorecam_weights
from ensemblecam.errors import InputError

Target = str | int
Precision = Literal["fp32", "bf16"]


def _spatial_outputs(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, tuple]]:
    """(name, output shape) of every submodule, in order of completion, for one zero input."""
    shapes: list[tuple[str, tuple]] = []
    handles = []

    def record(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                shapes.append((name, tuple(out.shape)))

        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(record(name)))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def spatial_layers(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of modules whose output has extent > 1 in every spatial dim, in forward order."""
    n = len(input_shape) + 1
    names = [
        name for name, shape in _spatial_outputs(model, input_shape)
        if len(shape) == n and all(s > 1 for s in shape[2:])
    ]  # fmt: skip
    return list(dict.fromkeys(reversed(names)))[::-1]


def find_target_layer(model: nn.Module, input_shape: Sequence[int], name: str | None = None) -> str:
    """The target layer: ``name`` if given (checked), else the last module whose output has
    spatial extent > 1 in every spatial dimension for an input of ``input_shape`` (C, *S)."""
    modules = dict(model.named_modules())
    if name is not None:
        if name in modules and name:
            return name
        cands = spatial_layers(model, input_shape)
        tail = ", ".join(cands[-8:]) or "none"
        raise InputError(f"layer {name!r} is not a module of the network; candidates: {tail}")
    cands = spatial_layers(model, input_shape)
    if not cands:
        raise InputError(
            f"{type(model).__name__}: no layer with spatial output (> 1 in every spatial dim) "
            f"for input shape {tuple(input_shape)}; CAMs need a convolutional layer"
        )
    return cands[-1]


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` of the network (the classification head for CAM)."""
    found = None
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            found = mod
    return found


@contextmanager
def frozen_params(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside the block (restored afterwards)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def _noise_key(seed: int, key: int) -> int:
    return zlib.crc32(f"{seed}:{key}".encode()) & 0x7FFFFFFF


@dataclass
class CamResult:
    """Maps of one batch: ``maps[method]`` (B, *size) float32, logits (B, n_classes),
    ``probs`` softmax probability of class 1 (B,), ``target`` class index per image (B,);
    ``layer_maps[method]`` the method's (ReLU'd) map at the first target layer, before
    upsampling, of the un-flipped image."""

    maps: dict[str, Tensor]
    logits: Tensor
    probs: Tensor
    target: Tensor
    layer_maps: dict[str, Tensor] = field(default_factory=dict)


class CamEngine:
    """Compute any subset of :data:`METHODS` for a batch with one forward/backward pass.

    Args:
        model: classifier mapping (B, C, *S) to (B, n_classes) logits; put in eval mode.
        methods: method names (see :data:`ensemblecam.cam.methods.METHODS`).
        layer: dotted module name of the target layer; None finds it automatically; a
            list of names fuses the maps of those layers (:func:`~ensemblecam.cam.methods.fuse`):
            every layer's activation and gradient come from the same forward/backward pass.
        target: ``"lesion"`` (class 1), ``"predicted"`` (argmax) or a class index.
        smooth_n, smooth_sigma: Smooth Grad-CAM++'s number of noisy inputs and noise std
            (input units); noise is seeded per image from (``seed``, image key).
        score_batch: masked inputs per forward pass in Score-CAM (256: on a 2-core CPU a
            ResNet-34 at 128x128 costs ~15 ms/input at 256 vs ~24 at 64 and ~38 at 32).
        top_k: Score-CAM approximation keeping the k highest-energy channels (None = exact).
        accelerate: run Score-CAM's masked passes through a frozen TorchScript trace of the
            model (``torch.jit.freeze`` + ``optimize_for_inference``), checked against eager
            on the first batch (falls back to eager if tracing fails or disagrees).
        score_precision: ``"fp32"`` scores every masked input in float32; ``"bf16"`` scores
            them with a bfloat16 copy of the network (BatchNorm folded in float32 first,
            channels-last) and re-scores the most influential channels in float32 until
            the estimated error of the normalised map is <= ``score_tol`` (see
            :mod:`ensemblecam.cam.scorecam`). Faster only where bfloat16 is native
            (CPUs with AVX512-BF16 or AMX, recent GPUs).
        score_tol: target max error of a normalised Score-CAM map in ``"bf16"`` mode
            (``inf``: no float32 re-scoring).
        flip_tta: horizontal-flip test-time augmentation: each batch is run as the images
            and their mirror images (flipped along the last axis) in one pass; a slice's
            map averages the image's map and the flipped-back map of its mirror image
            (:func:`~ensemblecam.cam.methods.fuse`), its probability the two softmax
            probabilities; ``target="predicted"`` takes the class of highest mean
            probability, for both views.
    """

    def __init__(
        self,
        model: nn.Module,
        methods: Sequence[str] = ("gradcam",),
        layer: str | Sequence[str] | None = None,
        target: Target = "lesion",
        smooth_n: int = 8,
        smooth_sigma: float = 0.1,
        seed: int = 0,
        score_batch: int = 256,
        top_k: int | None = None,
        accelerate: bool = True,
        score_precision: Precision = "fp32",
        score_tol: float = 1e-3,
        flip_tta: bool = False,
    ) -> None:
        bad = [m for m in methods if m not in M.METHODS]
        if bad or not methods:
            raise InputError(
                f"CAM method {', '.join(bad) or '(none)'!s}: expected any of {', '.join(M.METHODS)}"
            )
        if isinstance(target, str) and target not in ("lesion", "predicted"):
            try:
                target = int(target)
            except ValueError:
                raise InputError(
                    f"target {target!r}: expected 'lesion', 'predicted' or a class index"
                ) from None
        if isinstance(target, int) and target < 0:
            raise InputError(f"target class {target}: must be >= 0")
        if smooth_n < 1 or smooth_sigma < 0:
            raise InputError(
                f"smooth_n {smooth_n} / smooth_sigma {smooth_sigma}: need n >= 1, sigma >= 0"
            )
        if top_k is not None and top_k < 1:
            raise InputError(f"top_k {top_k}: must be >= 1")
        if score_batch < 1:
            raise InputError(f"score_batch {score_batch}: must be >= 1")
        if score_precision not in ("fp32", "bf16"):
            raise InputError(f"score_precision {score_precision!r}: expected fp32 or bf16")
        if not score_tol >= 0:
            raise InputError(f"score_tol {score_tol}: must be >= 0")
        names = [layer] if isinstance(layer, str) else None if layer is None else list(layer)
        if names is not None and (not names or not all(isinstance(n, str) for n in names)):
            raise InputError(f"layer {layer!r}: expected a module name or a list of names")
        self.model = model.eval()
        self.methods = list(dict.fromkeys(methods))
        #: target layer names (None until resolved when found automatically)
        self.layers: list[str] | None = None if names is None else list(dict.fromkeys(names))
        self._layer_checked = False
        self.flip_tta = bool(flip_tta)
        self.target = target
        self.smooth_n = smooth_n
        self.smooth_sigma = smooth_sigma
        self.seed = seed
        self.score_batch = score_batch
        self.top_k = top_k
        self.accelerate = accelerate
        self.score_precision = score_precision
        self.score_tol = score_tol
        self._fast: Callable[[Tensor], Tensor] | None = None
        self._coarse: Callable[[Tensor], Tensor] | None = None
        self.score_stats = ScoreStats()
        self._capture = False
        self._need_grad = False
        self._acts: dict[str, list[Tensor]] = {}

    @property
    def layer(self) -> str | None:
        """The target layer names joined by ``+`` (one name: that name; None: not resolved)."""
        return None if self.layers is None else "+".join(self.layers)

    # ----------------------------------------------------------------- layer and hook
    def resolve_layers(self, input_shape: Sequence[int]) -> list[str]:
        """Find/check the target layer(s) for inputs of shape (C, *S); returns the names."""
        if not self._layer_checked:
            if self.layers is None:
                self.layers = [find_target_layer(self.model, input_shape)]
            else:
                self.layers = [find_target_layer(self.model, input_shape, n) for n in self.layers]
            self._layer_checked = True
        assert self.layers is not None
        return list(self.layers)

    def resolve_layer(self, input_shape: Sequence[int]) -> str:
        """Find/check the target layer(s) for inputs of shape (C, *S); the names joined by +."""
        return "+".join(self.resolve_layers(input_shape))

    def _hook(self, name: str) -> Callable[..., Any]:
        """Forward hook of layer ``name``: records its output (see :meth:`_hooked`)."""

        def hook(_m: nn.Module, _i: Any, out: Any) -> Any:
            if not self._capture:
                return None
            if not isinstance(out, Tensor):
                raise InputError(f"layer {name!r} does not output a tensor")
            if self._need_grad:
                # the first target layer becomes a leaf; a later one already depends on it
                # and stays in the graph (its gradient flows on to the earlier layer)
                act = out if out.requires_grad else out.detach().requires_grad_(True)
                self._acts[name].append(act)
                return act.clone()  # later in-place ops must not touch the recorded tensor
            self._acts[name].append(out.detach())
            return None

        return hook

    @contextmanager
    def _hooked(self, need_grad: bool) -> Iterator[None]:
        assert self.layers is not None
        handles = [
            self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.layers
        ]
        self._capture, self._need_grad = True, need_grad
        self._acts = {n: [] for n in self.layers}
        try:
            yield
        finally:
            self._capture = False
            for h in handles:
                h.remove()

    def _recorded(self) -> list[Tensor]:
        """The one activation of each target layer recorded by the last forward pass."""
        out = []
        for name, acts in self._acts.items():
            if len(acts) != 1:
                raise InputError(f"layer {name!r} ran {len(acts)} times in one forward")
            out.append(acts[0])
        return out

    def close(self) -> None:
        """Drop cached traced models (hooks never outlive a call)."""
        self._fast = self._coarse = None

    def __enter__(self) -> CamEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- helpers
    def _targets(self, logits: Tensor, views: int = 1) -> Tensor:
        """Target class per row of ``logits`` (``views`` stacked copies of the batch: the
        predicted class is that of the highest probability averaged over the views)."""
        n_cls = logits.shape[1]
        if self.target == "predicted":
            if views == 1:
                return logits.argmax(dim=1)
            probs = torch.softmax(logits.float(), dim=1).reshape(views, -1, n_cls).mean(0)
            return probs.argmax(dim=1).repeat(views)
        cls = 1 if self.target == "lesion" else int(self.target)
        if cls >= n_cls:
            raise InputError(f"target class {cls}: the network has only {n_cls} outputs")
        return torch.full((logits.shape[0],), cls, dtype=torch.long, device=logits.device)

    def _forward_grad(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and each target layer's activation (the first a leaf), with a graph above
        the first target layer only."""
        with self._hooked(need_grad=True), torch.enable_grad():
            logits = self.model(x)
        return logits, self._recorded()

    def _score_forward(self, x_example: Tensor) -> Callable[[Tensor], Tensor]:
        if self._fast is None:
            self._fast = self._traced(self.model, x_example, 1e-4, optimize=True)
        return self._fast

    def _coarse_forward(self, x_example: Tensor) -> Callable[[Tensor], Tensor] | None:
        """The bfloat16 network of ``score_precision="bf16"`` (float32 logits out)."""
        if self.score_precision == "fp32":
            return None
        if self._coarse is None:
            net = copy.deepcopy(self.model)
            try:  # fold BatchNorm into the convolutions while still in float32
                from torch.fx.experimental.optimization import fuse

                net = fuse(net)
            except Exception:
                pass
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(
                x_example.ndim, torch.contiguous_format
            )
            net = net.to(torch.bfloat16).to(memory_format=fmt)
            example = x_example.to(torch.bfloat16).contiguous(memory_format=fmt)
            traced = self._traced(net, example, 5e-2, optimize=False)

            def coarse(t: Tensor) -> Tensor:
                return traced(t.to(torch.bfloat16).contiguous(memory_format=fmt)).float()

            self._coarse = coarse
        return self._coarse

    def _traced(
        self, net: nn.Module, example: Tensor, rtol: float, optimize: bool
    ) -> Callable[[Tensor], Tensor]:
        """A frozen TorchScript trace of ``net`` when ``accelerate`` is on and the trace
        agrees with eager within ``rtol`` on ``example``; else ``net`` itself."""
        if not self.accelerate:
            return net
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                fast = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
                if optimize:
                    fast = torch.jit.optimize_for_inference(fast)
                ref, got = net(example).float(), fast(example).float()
                if torch.allclose(ref, got, rtol=rtol, atol=rtol * float(ref.abs().max()) + 1e-5):
                    return fast
        except Exception:
            pass
        return net

    def _smooth_grads(
        self, x: Tensor, target: Tensor, keys: Sequence[int]
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per target layer, means of g, g^2, g^3 over ``smooth_n`` noisy copies of each
        image (batched)."""
        n = self.smooth_n
        noise = torch.empty((x.shape[0], n, *x.shape[1:]), dtype=x.dtype)
        for i, key in enumerate(keys):
            gen = torch.Generator().manual_seed(_noise_key(self.seed, int(key)))
            noise[i] = torch.randn((n, *x.shape[1:]), generator=gen, dtype=x.dtype)
        noisy = (x.unsqueeze(1) + self.smooth_sigma * noise.to(x.device)).flatten(0, 1)
        tgt = target.repeat_interleave(n)
        sums: list[list[Tensor]] = []  # per layer: g, g^2, g^3 of every noisy input
        step = max(1, self.score_batch)
        for start in range(0, noisy.shape[0], step):
            sl = slice(start, start + step)
            logits, acts = self._forward_grad(noisy[sl])
            with torch.enable_grad():
                grads = torch.autograd.grad(logits.gather(1, tgt[sl, None]).sum(), acts)
            for i, g in enumerate(grads):
                g = g.detach()
                parts = [g, g * g, g * g * g]
                if len(sums) <= i:
                    sums.append([p.new_zeros((noisy.shape[0], *p.shape[1:])) for p in parts])
                for s, p in zip(sums[i], parts, strict=True):
                    s[sl] = p
        b = x.shape[0]
        return [
            tuple(s.reshape(b, n, *s.shape[1:]).mean(1) for s in layer)  # type: ignore[misc]
            for layer in sums
        ]

    # ----------------------------------------------------------------- main call
    def __call__(
        self, x: Tensor, keys: Sequence[int] | None = None, raw: bool = False
    ) -> CamResult:
        """Maps of every method for the batch ``x`` (B, C, *S).

        ``keys`` identify images for Smooth Grad-CAM++'s noise (default 0..B-1; pass store
        indices so results do not depend on batching). ``raw`` skips the min-max. With
        ``flip_tta`` the batch runs as (B images, B mirror images) in one pass (a mirror
        image gets its image's key); ``logits`` are then the un-flipped images'.
        """
        if x.ndim < 3:
            raise InputError(f"input of shape {tuple(x.shape)}: expected (B, C, *spatial)")
        layers = self.resolve_layers(tuple(x.shape[1:]))
        keys = list(range(x.shape[0])) if keys is None else list(keys)
        if len(keys) != x.shape[0]:
            raise InputError(f"{len(keys)} keys for a batch of {x.shape[0]}")
        grad_methods = [m for m in self.methods if m in M.GRADIENT_METHODS]
        size = tuple(x.shape[2:])
        b, views = x.shape[0], 2 if self.flip_tta else 1
        if views > 1:
            x, keys = torch.cat([x, x.flip(-1)]), keys * views
        layer_maps: dict[str, list[Tensor]] = {}
        with frozen_params(self.model):
            if grad_methods:
                logits, acts_g = self._forward_grad(x)
                target = self._targets(logits, views)
                grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts_g)
                acts = [a.detach() for a in acts_g]
                gs: list[Tensor | None] = [g.detach() for g in grads]
                logits = logits.detach()
            else:
                with self._hooked(need_grad=False), torch.inference_mode():
                    logits = self.model(x)
                acts, gs = [a.clone() for a in self._recorded()], [None] * len(layers)
                logits = logits.clone()
                target = self._targets(logits, views)
            smooth = (
                self._smooth_grads(x, target, keys)
                if "smoothgradcampp" in self.methods
                else [None] * len(layers)
            )
            with torch.no_grad():
                for method in self.methods:
                    layer_maps[method] = [
                        self._method_map(method, x, a, g, target, keys, name, sm)
                        for name, a, g, sm in zip(layers, acts, gs, smooth, strict=True)
                    ]
        self._acts = {}
        logits = logits.float()
        probs = (
            torch.softmax(logits, dim=1)[:, 1]
            if logits.shape[1] > 1
            else torch.sigmoid(logits[:, 0])
        )
        if views > 1:
            probs = probs.reshape(views, b).mean(0)
            logits, target = logits[:b], target[:b]
        maps = {
            m: M.fuse([lm.float() for lm in lms], size, views, normalise=not raw)
            for m, lms in layer_maps.items()
        }
        first = {m: lms[0][:b] for m, lms in layer_maps.items()}
        return CamResult(maps, logits, probs, target, first)

    def _method_map(
        self,
        method: str,
        x: Tensor,
        a: Tensor,
        g: Tensor | None,
        target: Tensor,
        keys: list[int],
        layer: str,
        smooth: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """One method's ReLU'd map (B, *S) at ``layer`` (activations ``a``, gradients ``g``;
        ``smooth``: Smooth Grad-CAM++'s mean g, g^2, g^3 at that layer)."""
        if method == "cam":
            fc = last_linear(self.model)
            if fc is None or fc.in_features != a.shape[1]:
                raise InputError(
                    f"method cam needs global pooling + a linear head on layer {layer!r} "
                    f"({a.shape[1]} channels); use gradcam instead"
                )
            return M.combine(a, M.cam_weights(fc.weight.detach(), target))
        if method == "scorecam":
            example = x[: min(len(x), 2)]
            w = scorecam_weights(
                self._score_forward(example), x, a, target, self.score_batch, self.top_k,
                self.score_stats, self._coarse_forward(example), self.score_tol,
            )  # fmt: skip
            return M.combine(a, w)
        assert g is not None
        if method == "gradcam":
            return M.combine(a, M.gradcam_weights(a, g))
        if method == "gradcampp":
            return M.combine(a, M.gradcampp_weights(a, g * g, g * g * g, g))
        if method == "xgradcam":
            return M.combine(a, M.xgradcam_weights(a, g))
        if method == "layercam":
            return M.combine(a, M.layercam_weights(a, g))
        if method == "smoothgradcampp":
            assert smooth is not None
            mg, mg2, mg3 = smooth
            return M.combine(a, M.gradcampp_weights(a, mg2, mg3, mg))
        raise InputError(f"CAM method {method!r}: unknown")


def compute_cams(
    model: nn.Module,
    x: Tensor,
    methods: Sequence[str] = ("gradcam",),
    layer: str | Sequence[str] | None = None,
    target: Target = "lesion",
    raw: bool = False,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """One-call helper: ``{method: maps (B, *S)}`` for ``x`` (see :class:`CamEngine`)."""
    with CamEngine(model, methods, layer, target, **kwargs) as engine:
        return engine(x, raw=raw).maps
