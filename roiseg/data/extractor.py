"""ONNX Runtime feature extractor: exposes an inner tensor by name, picks and reports the provider."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx

from roiseg.common.errors import RoisegError
from roiseg.common.providers import ProviderError, cuda_available, make_session
from roiseg.data import fine_projection

log = logging.getLogger(__name__)


class ExtractorError(RoisegError):
    pass


class UnknownTensorError(ExtractorError):
    """The tensor name is not in the graph (the message lists the candidates for ``--feature-name``)."""


def _dim(d) -> int | None:
    return d.dim_value if d.HasField("dim_value") else None


def _shape_of(vi) -> list:
    return [_dim(d) for d in vi.type.tensor_type.shape.dim] if vi.type.tensor_type.HasField("shape") else []


def graph_outputs(model: onnx.ModelProto) -> dict[str, list]:
    """The model's own outputs and their declared shapes (None / names for dynamic dims)."""
    return {o.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in o.type.tensor_type.shape.dim] for o in model.graph.output}


# ``--fine-feature input``: the preprocessed model input itself (stride 1, 3 channels) as the fine map
INPUT_TENSOR = "input"


def expose_tensor(model: onnx.ModelProto, name: str | tuple, as_fp16: bool = False, keep: tuple = ()) -> onnx.ModelProto:
    """Make ``name`` the graph's first output (in memory) so ORT prunes everything after it;
    several names (the feature, then the fine map): the first outputs, in that order; ``keep``:
    original outputs to keep after them (the detection head, for ``predict``).

    Unknown names raise with the list of tensors whose spatial size is input/8 (the fine map:
    input/4 and input/2), so the user can pick one.
    """
    names = (name,) if isinstance(name, str) else tuple(name)
    outputs = {o.name: o for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output}
    for k, n in enumerate(names):
        if n not in produced and n not in outputs:
            raise UnknownTensorError(_unknown_tensor_message(model, n, (8,) if k == 0 else (4, 2)))
    kept = [outputs[k] for k in keep]
    del model.graph.output[:]
    for n in names:
        if as_fp16:
            model.graph.output.append(_fp16_output(model, n))
        else:   # the real shape is read from the first run; ORT only needs the element type here
            model.graph.output.append(outputs.get(n) or
                                      onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    model.graph.output.extend(kept)
    return model


def _fp16_output(model: onnx.ModelProto, name: str):
    """Clip to the fp16 range and cast inside the graph: vectorized in ORT, half the bytes out."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=11)
    clipped, out = f"{name}__clipped", f"{name}__fp16"
    if opset >= 11:
        lo = onnx.numpy_helper.from_array(np.array(-65504.0, np.float32), f"{name}__lo")
        hi = onnx.numpy_helper.from_array(np.array(65504.0, np.float32), f"{name}__hi")
        model.graph.initializer.extend([lo, hi])
        clip = onnx.helper.make_node("Clip", [name, lo.name, hi.name], [clipped])
    else:
        clip = onnx.helper.make_node("Clip", [name], [clipped], min=-65504.0, max=65504.0)
    cast = onnx.helper.make_node("Cast", [clipped], [out], to=onnx.TensorProto.FLOAT16)
    model.graph.node.extend([clip, cast])
    return onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT16, None)


def _unknown_tensor_message(model, name, strides=(8,)) -> str:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {vi.name: _shape_of(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    except Exception:  # shape inference is best effort (custom ops)
        shapes = {o.name: _shape_of(o) for o in model.graph.output}
    inp = _shape_of(model.graph.input[0])
    h, w = (inp[2], inp[3]) if len(inp) == 4 else (None, None)
    cands = [f"  {n}  {s}" for st in strides for n, s in shapes.items()
             if len(s) == 4 and h and s[2] == h // st and s[3] == w // st]
    if strides != (8,):
        cands.append(f"  {INPUT_TENSOR}  (the preprocessed model input, [3, {h}, {w}])")
    listing = "\n".join(cands[:200]) or "  (none found by shape inference)"
    sizes = " or ".join(f"input/{st} ({h // st if h else '?'}x{w // st if w else '?'})" for st in strides)
    option = "--feature-name" if strides == (8,) else "--fine-feature"
    return (f"tensor {name!r} does not exist in the ONNX graph. Tensors with spatial size "
            f"{sizes} you can pass to {option}:\n{listing}")


def read_onnx(path: Path, what: str = "ONNX model") -> onnx.ModelProto:
    """Load an ONNX file; a missing or unreadable one is one clear error."""
    if path.is_dir():
        raise ExtractorError(f"the {what} {path} is a folder: give the .onnx file")
    if not path.is_file():
        raise ExtractorError(f"{what} not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        kind = ("a JSON file" if head[:1] in (b"{", b"[") else "a text file" if _is_text(head) else
                f"damaged or not ONNX ({type(exc).__name__})")
        raise ExtractorError(f"{path} is not an ONNX model: it is {kind}; give the {what}") from exc


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
        return bool(head) and all(c >= 32 or c in (9, 10, 13) for c in head)
    except UnicodeDecodeError:
        return False


class Extractor:
    """One ORT session returning the named feature tensor for a batch of preprocessed images."""

    def __init__(self, onnx_path: str | Path, feature_name: str, provider: str = "auto",
                 threads: int | None = None, trt_cache: Path | None = None, streams: int | None = None,
                 extra_outputs: tuple | str = (), batch_max: int = 8, device_id: int | None = None,
                 fine_name: str | None = None):
        """``streams``: concurrent ``run`` calls the caller intends (CPU default: one per core,
        each single-threaded); ``threads``: intra-op threads per run (default cores / streams);
        ``extra_outputs``: original graph outputs also returned by :meth:`run_all` ("all": every
        one but the feature, e.g. the detection head); ``batch_max``: the largest batch the caller
        sends (TensorRT's profile); ``device_id``: the GPU (default: ``providers.device_id_for()``);
        ``fine_name``: a finer tensor returned too by :meth:`run_fine` (``INPUT_TENSOR``: the
        preprocessed input itself)."""
        onnx_path = Path(onnx_path)
        model = read_onnx(onnx_path)
        self.outputs = graph_outputs(model)
        self.feature_name, self.fine_name, self.fine_projection = feature_name, fine_name, None
        model = self._expose(model, onnx_path, extra_outputs)
        self.session = self._session(model, onnx_path, provider, threads, trt_cache, streams, batch_max, device_id)
        self.provider = self.session.get_providers()[0]
        # fp16 engines compute the features in half precision; a store records what made it
        self.precision = "fp16" if self.provider == "TensorrtExecutionProvider" else "fp32"
        self._probe(onnx_path)

    def _expose(self, model, onnx_path: Path, extra_outputs) -> "onnx.ModelProto":
        """The graph with the feature tensor (and the fine map) as outputs, plus the model's own
        outputs asked for (``extra_outputs``)."""
        feature_name, fine_name = self.feature_name, self.fine_name
        if fine_name == feature_name:
            raise ExtractorError(f"--fine-feature {fine_name} is the feature map itself: pick a finer tensor "
                                 f"(stride 4 or 2) or {INPUT_TENSOR!r}")
        fine_in_graph = (fine_name,) if fine_name and fine_name != INPUT_TENSOR else ()
        if extra_outputs == "all":
            extra_outputs = tuple(k for k in self.outputs if k not in (feature_name, *fine_in_graph))
        missing = [o for o in extra_outputs if o not in self.outputs]
        if missing:
            raise ExtractorError(f"{onnx_path.name} has no output {missing[0]!r} (outputs: "
                                 f"{', '.join(f'{k} {v}' for k, v in self.outputs.items())})")
        self.extra_outputs = tuple(extra_outputs)
        self._n_exposed = 1 + len(fine_in_graph)
        return expose_tensor(model, (feature_name, *fine_in_graph), as_fp16=True, keep=self.extra_outputs)

    def _session(self, model, onnx_path: Path, provider: str, threads, trt_cache, streams, batch_max: int,
                 device_id):
        """The ONNX Runtime session: ``streams`` concurrent runs of ``threads`` each (on a CPU one
        single-threaded run per core), never spinning between ops."""
        import onnxruntime as ort
        on_cpu = provider == "cpu" or not cuda_available()
        cores = os.cpu_count() or 1
        self.streams = streams or (cores if on_cpu else 1)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or max(1, cores // self.streams)
        opts.log_severity_level = 3
        # No busy-waiting between ops: the cache's decode and write threads need those cycles.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return make_session(model, opts, provider, trt_cache, onnx_path.name, batch_max=batch_max, fp16=True,
                                device_id=device_id)
        except ProviderError as exc:
            raise ExtractorError(str(exc)) from exc

    def _probe(self, onnx_path: Path) -> None:
        """The input size and batch, and the actual shapes of every output, from one run on zeros."""
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shp = inp.shape
        if len(shp) != 4 or not all(isinstance(s, int) for s in shp[2:]):
            raise ExtractorError(f"model input {inp.name} {shp} is not [N,3,H,W] with a fixed H, W")
        self.input_hw = (int(shp[2]), int(shp[3]))
        self.fixed_batch = shp[0] if isinstance(shp[0], int) else None
        feat, extra = self.run_all(np.zeros((self.fixed_batch or 1, 3, *self.input_hw), np.float32))
        fine = extra.pop(self.fine_name) if self.fine_name else None    # detection outputs stay in extra_shapes
        self.extra_shapes = {k: list(v.shape) for k, v in extra.items()}  # actual, not declared
        self.feature_shape = tuple(int(s) for s in feat.shape[1:])
        if len(self.feature_shape) != 3:
            raise ExtractorError(f"tensor {self.feature_name} has shape {list(feat.shape)}, expected [N,C,H,W]")
        self.fine_shape = None
        if fine is not None:
            self.fine_shape = tuple(int(s) for s in fine.shape[1:])
            if len(self.fine_shape) != 3 or self.fine_shape[1] <= self.feature_shape[1]:
                raise ExtractorError(f"--fine-feature {self.fine_name} has shape {list(fine.shape)}: expected "
                                     f"[N,C,H,W] finer than the feature map {list(self.feature_shape)}")
        log.info("extractor %s -> %s %s on %s", onnx_path.name, self.feature_name, list(self.feature_shape),
                 self.provider)
        stride = self.input_hw[0] / self.feature_shape[1]
        if stride != 8:
            # ROIs are normalized, so any stride works; but masks come from 8x8-pixel cells by design
            log.warning("%s has stride %g (input %d / map %d), not 8: the decoder runs on it, but coarser maps "
                        "give coarser masks; the intended tensor is a stride-8 one (input/8)", self.feature_name,
                        stride, self.input_hw[0], self.feature_shape[1])

    def run(self, batch: np.ndarray) -> np.ndarray:
        """``[B,3,H,W]`` float32 -> ``[B,C,Hf,Wf]`` float16 (clipped to its range); splits batches a
        fixed-batch model refuses."""
        return self.run_all(batch)[0]

    def run_all(self, batch: np.ndarray) -> tuple[np.ndarray, dict]:
        """Features and the ``extra_outputs`` (by name; the fine map too, under ``fine_name``) of
        one batch, from one ORT run."""
        fb = self.fixed_batch
        if fb and batch.shape[0] != fb:
            parts = [self.run_all(batch[i:i + fb]) for i in range(0, batch.shape[0], fb)]
            return (np.concatenate([p[0] for p in parts]),
                    {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]})
        out = self.session.run(None, {self.input_name: batch})
        extra = dict(zip(self.extra_outputs, out[self._n_exposed:]))
        if self.fine_name:
            fine = out[1] if self.fine_name != INPUT_TENSOR else np.clip(batch, -65504, 65504).astype(np.float16)
            extra[self.fine_name] = fine if self.fine_projection is None else fine_projection.apply(
                self.fine_projection, fine)
        return out[0], extra

    def set_fine_projection(self, p: dict | None) -> None:
        """Reduce the fine map's channels with ``p`` (``roiseg.data.fine_projection``) from now on
        (once: ``fine_shape`` then becomes the reduced shape)."""
        if p is None:
            return
        if self.fine_projection is not None:
            raise ExtractorError("the fine-map projection is already set")
        c, h, w = self.fine_shape
        if len(p["mean"]) != c:
            raise ExtractorError(f"the fine-map projection expects {len(p['mean'])} channels, but {self.fine_name} "
                                 f"has {c}")
        self.fine_projection = p
        self.fine_shape = (len(p["components"]), h, w)

    def run_fine(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, fine map or None) of one batch, fp16, from one ORT run."""
        feats, extra = self.run_all(batch)
        return feats, extra.get(self.fine_name) if self.fine_name else None
