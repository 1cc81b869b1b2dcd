"""`cli.py export`: write the decoder graph (and extractor + decoder as one), checked before it
replaces anything: opset range, parity and an ONNX Runtime load on temp files, then the rename.
The graph itself is ``export_graph.py``; the checks are ``parity.py``."""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from roiseg.common.files import atomic_write, check_output_file, refuse_overlap
from roiseg.data.store_meta import FeatureSource
from roiseg.export.graph import (
    OUTPUT_DOC,
    DecoderExport,
    ExportError,
    ExportSpec,
    sample_inputs,
)
from roiseg.export.parity import check_parity, cpu_session
from roiseg.modeling.checkpoint import decoder_from_checkpoint, load_checkpoint

log = logging.getLogger(__name__)


def export_metadata(spec: ExportSpec, meta: dict | None = None) -> dict:
    """Key -> string for the ONNX metadata: the graph's contract and what predict needs."""
    out = {"roi_padding": spec.roi_padding, "input_hw": list(spec.input_hw), "mask_format": spec.masks,
           "mask_threshold": spec.threshold, "half": spec.half, "outputs": {k: OUTPUT_DOC[k] for k in spec.outputs},
           **(meta or {})}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in out.items()}


def predictor_metadata(source: FeatureSource, checkpoint: str) -> dict:
    """What an ONNX-only predictor needs from the checkpoint: its feature source (extractor tensor
    and sha256, preprocessing, ROI padding, shapes, fine map), under the graph's ``featcache`` key."""
    return {"checkpoint": checkpoint, "featcache": source.to_dict()}


MIN_OPSET = 16     # RoiAlign with coordinate_transformation_mode=half_pixel (aligned=True)


def supported_opsets() -> range:
    """Opsets this installation can both write (torch's TorchScript exporter) and run (ONNX Runtime)."""
    from functools import lru_cache

    @lru_cache(maxsize=1)
    def ort_max() -> int:
        import onnxruntime as ort
        from onnx import TensorProto, helper
        best = MIN_OPSET
        for v in range(MIN_OPSET, 40):
            g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", v)], ir_version=8)
            try:
                ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            except Exception:  # noqa: BLE001 - the first opset it refuses ends the range
                break
            best = v
        return best
    try:
        from torch.onnx._constants import (
            ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as torch_max,
        )
    except ImportError:
        torch_max = 20
    return range(MIN_OPSET, min(torch_max, ort_max()) + 1)


def check_opset(opset: int) -> None:
    ok = supported_opsets()
    if opset not in ok:
        raise ExportError(f"--opset {opset} is not supported here: torch writes and ONNX Runtime runs opsets "
                          f"{ok.start}-{ok.stop - 1} (RoiAlign needs 16+)")


def export_decoder(model, spec: ExportSpec, out: Path, opset: int = 17, meta: dict | None = None) -> Path:
    """Write the decoder graph to ``out`` (temp file + rename; ``export_checked`` also validates
    before the rename)."""
    wrapper = DecoderExport(model.cpu().float(), spec)
    inputs = sample_inputs(spec, 6)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dyn = {"features": {0: "B"}, "fine": {0: "B"}, "rois": {0: "N"}, "image_rects": {0: "B"}, "instance_map": {0: "B"},
           **{k: {0: "N"} for k in ("masks", "logits", "roi_boxes", "probs", "scores")}}
    dyn = {k: v for k, v in dyn.items() if k in spec.inputs + spec.outputs}
    with atomic_write(out) as tmp:
        # the tracer's notes (constant folding, Python values in the graph) are about its internals
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, inputs, str(tmp), input_names=spec.inputs, output_names=spec.outputs,
                              opset_version=opset, dynamo=False, dynamic_axes=dyn)
        m = onnx.load(str(tmp))
        # which quality score the scores output is: a runtime that averages two passes (flip TTA)
        # recomputes a certainty from the averaged probabilities, and averages a score head's
        kind = {"mask_score": "score head" if getattr(model, "score_head", None) is not None else "certainty"}
        for k, v in export_metadata(spec, {**kind, **(meta or {})}).items():
            m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
        onnx.save(m, str(tmp))
    return out


def export_checked(model, spec: ExportSpec, out: Path, opset: int, source: FeatureSource, checkpoint: str,
                   end_to_end: tuple[Path, Path] | None = None) -> dict:
    """Write the decoder graph (and, with ``end_to_end`` = (extractor ONNX, path), the joined graph),
    check parity with PyTorch and that ONNX Runtime loads each, all on temp files; rename them into
    place only when everything passed, so a failure keeps the previous files."""
    check_opset(opset)
    out = Path(out)
    with atomic_write(out) as tmp_dec:
        export_decoder(model, spec, tmp_dec, opset, predictor_metadata(source, checkpoint))
        report = check_parity(model, tmp_dec, spec)
        if end_to_end is not None:
            ext, e2e = end_to_end
            with atomic_write(e2e) as tmp_e2e:
                export_end_to_end(ext, source, tmp_dec, tmp_e2e)
                cpu_session(tmp_e2e)
    return report


@dataclass
class ExportResult:
    decoder: Path
    end_to_end: Path | None
    spec: ExportSpec
    parity: dict


def is_exported_graph(path: Path) -> bool:
    """An ONNX file `export` wrote (its ``featcache`` metadata), which a new export may replace."""
    model = onnx.load(str(path), load_external_data=False)
    return any(p.key == "featcache" for p in model.metadata_props)


def default_paths(checkpoint: Path, out: Path | None, half: bool, end_to_end: bool) -> tuple[Path, Path | None]:
    """``<checkpoint>.decoder.onnx`` (``.half.decoder.onnx``) unless ``out``; the end-to-end graph
    beside it as ``<stem>.e2e.onnx``."""
    out = Path(out or checkpoint.with_suffix(".half.decoder.onnx" if half else ".decoder.onnx"))
    stem = out.name[: -len(".decoder.onnx")] if out.name.endswith(".decoder.onnx") else out.stem
    return out, (out.with_name(f"{stem}.e2e.onnx") if end_to_end else None)


def export_checkpoint(checkpoint: Path, out: Path | None = None, opset: int = 17, end_to_end: bool = False,
                      extractor: Path | None = None, e2e_out: Path | None = None, **spec_options) -> ExportResult:
    """`cli.py export` and the demo: a checkpoint's decoder (its EMA weights) as ONNX, and with
    ``end_to_end`` the extractor (``extractor``, else the checkpoint's, checked by sha256) joined in
    front.  Everything a user can get wrong is checked before any work; no output may replace a file
    the checkpoint's run points at; parity and an ONNX Runtime load are checked on temp files first.
    ``spec_options``: ``ExportSpec``'s masks, threshold, full_probs, half."""
    from roiseg.runtime.pipeline import open_extractor
    checkpoint = Path(checkpoint)
    check_opset(opset)
    ck = load_checkpoint(checkpoint)
    if ck.zero_features:
        raise ExportError(f"{checkpoint} is an ablation run trained on zeroed features (zero_features): its graph "
                          f"would read the real ones; `evaluate` and `predict --checkpoint` score it as trained")
    model, source = decoder_from_checkpoint(ck)
    out, e2e = default_paths(checkpoint, out, spec_options.get("half", False), end_to_end)
    e2e = Path(e2e_out) if end_to_end and e2e_out else e2e
    ext = Path(extractor or source.onnx_path) if end_to_end else None
    refuse_overlap({"--out": out, "the end-to-end graph": e2e},
                   {"--checkpoint": checkpoint, "--onnx": extractor or ext, **ck.referenced_inputs()})
    for path, flag in ((out, "--out"), (e2e, "the end-to-end graph")):
        check_output_file(path, flag, is_exported_graph, "an ONNX graph `cli.py export` wrote")
    if end_to_end:
        open_extractor(source, ext, "cpu", fine=source.fine is not None)   # as inference: exists, sha256
    spec = ExportSpec.from_source(source, **spec_options)
    try:
        parity = export_checked(model, spec, out, opset, source, checkpoint.name, (ext, e2e) if end_to_end else None)
    except OSError as exc:
        if exc.errno == 28:
            raise ExportError(f"disk full while writing {exc.filename or out}") from exc
        raise
    return ExportResult(out, e2e, spec, parity)


def export_end_to_end(extractor_onnx: Path, source: FeatureSource, decoder_onnx: Path, out: Path) -> Path:
    """Join extractor and decoder into one graph: images [1,3,H,W] + rois (+ image_rects) -> the
    decoder's outputs.  ``source`` names the feature tensor and, for a decoder that fuses one, the
    fine map (a tensor of the extractor, or its input) and the store's channel reduction of it (a 1x1
    conv).  The decoder's metadata comes along."""
    from roiseg.data.extractor import INPUT_TENSOR, expose_tensor
    feature_name = source.feature_name
    fine_name = source.fine.name if source.fine else None
    projection = source.fine_projection if source.fine else None
    model = onnx.load(str(extractor_onnx))
    io_map = [(feature_name, "features")]
    if fine_name == INPUT_TENSOR:    # the image itself: an Identity makes it a tensor to expose and connect
        model.graph.node.append(onnx.helper.make_node("Identity", [model.graph.input[0].name], ["fine_image"]))
        fine_name = "fine_image"
    ext = expose_tensor(model, (feature_name, fine_name) if fine_name else feature_name)
    if fine_name and projection:
        from roiseg.data.fine_projection import weights
        w, b = weights(projection)
        ext.graph.initializer.extend([onnx.numpy_helper.from_array(w[:, :, None, None], "fine_projection_w"),
                                      onnx.numpy_helper.from_array(b, "fine_projection_b")])
        ext.graph.node.append(onnx.helper.make_node("Conv", [fine_name, "fine_projection_w", "fine_projection_b"],
                                                    ["fine_projected"]))
        ext.graph.output.remove(next(o for o in ext.graph.output if o.name == fine_name))
        ext.graph.output.append(onnx.helper.make_tensor_value_info("fine_projected", onnx.TensorProto.FLOAT, None))
        fine_name = "fine_projected"
    if fine_name:
        io_map.append((fine_name, "fine"))
    dec = onnx.load(str(decoder_onnx))
    outputs = [o.name for o in dec.graph.output]
    ver = lambda m: max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))  # noqa: E731
    target = max(ver(ext), ver(dec))
    if ver(ext) != target:
        ext = onnx.version_converter.convert_version(ext, target)
    if ver(dec) != target:
        dec = onnx.version_converter.convert_version(dec, target)
    ext.ir_version = dec.ir_version = max(ext.ir_version, dec.ir_version)
    del ext.metadata_props[:]   # the joined graph's contract is the decoder's
    merged = onnx.compose.merge_models(ext, dec, io_map=io_map, prefix2="decoder/",
                                       outputs=[f"decoder/{o}" for o in outputs])
    _rename(merged.graph, {f"decoder/{k}": k for k in ["rois", "image_rects"] + outputs})
    onnx.checker.check_model(merged)
    with atomic_write(out) as tmp:
        onnx.save(merged, str(tmp))
    return Path(out)


def _rename(graph, names: dict) -> None:
    for v in list(graph.input) + list(graph.output):
        v.name = names.get(v.name, v.name)
    for node in graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
        node.output[:] = [names.get(x, x) for x in node.output]

