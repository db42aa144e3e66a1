"""DeepStream's files in the bundle: nvinfer and deepstream-app configs checked against each release's keys, the
normalization parameters proven against edgerun's preprocessing, the folded (uint8) model, the host measurement."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgedistill.errors import ExportError
from edgedistill.ship import deepstream, nvinfer
from edgerun.preprocess import PreprocessSpec, normalize
from edgerun.runtime.runners import OrtRunner


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _run(path, x):
    with OrtRunner(str(path)) as runner:
        return np.concatenate(
            [runner.infer({runner.input_names()[0]: x[i : i + 1]})[runner.output_names()[0]] for i in range(len(x))]
        )


def test_bundle_carries_deepstream_configs_for_both_releases(trained_run):
    bundle = trained_run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    folder = bundle / "deepstream"
    classes = manifest["classes"]
    assert (folder / "labels.txt").read_text() == ";".join(classes) + "\n"  # one output layer: one line
    assert "deepstream/ds6.0/config_infer_primary.txt" in manifest["files"]  # hashed, so signed with the bundle
    h, w = manifest["model"]["input_shape"][2:]
    spec = PreprocessSpec.from_dict(manifest["preprocess"])
    for sub, keys in (("ds6.0", deepstream.NVINFER_KEYS_6_0), ("ds7", deepstream.NVINFER_KEYS_7)):
        prop = deepstream.check_config(folder / sub / "config_infer_primary.txt", keys)
        assert prop["network-type"] == "1" and prop["process-mode"] == "1" and prop["network-mode"] == "2"
        assert prop["infer-dims"] == f"3;{h};{w}" and prop["batch-size"] == str(manifest["model"]["input_shape"][0])
        assert (folder / sub / prop["onnx-file"]).resolve() == (folder / "model.onnx").resolve()
        assert (folder / sub / prop["labelfile-path"]).is_file()
        assert prop["model-engine-file"] == "../model.onnx_b1_gpu0_fp16.engine"
        assert prop["output-blob-names"] == nvinfer.PROBS
        offsets = [float(v) for v in prop["offsets"].split(";")]
        assert offsets == pytest.approx([m / spec.scale for m in spec.mean], rel=1e-6)
        assert prop["model-color-format"] == "0"
        fp32 = deepstream.check_config(folder / sub / "config_infer_primary_fp32.txt", keys)
        assert fp32["network-mode"] == "0"
        app = (folder / sub / "deepstream_app_config.txt").read_text()
        assert "[source0]" in app and "camera-csi-sensor-id=0" in app and "config-file=config_infer_primary.txt" in app
    if manifest["variants"].get("int8", {}).get("status") == "accepted":
        assert not (folder / "ds7" / "config_infer_primary_int8.txt").exists()  # nvinfer would build FP16
        assert "int8-calib-file" in manifest["deepstream"]["int8"]
    host = manifest["metrics"]["deepstream"]
    assert 0 <= host["deepstream_top1"] <= 1 and host["images"] > 0
    assert host["difference"] == pytest.approx(host["deepstream_top1"] - host["bundle_top1"])
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["deepstream"]["deepstream_top1"] == host["deepstream_top1"]
    assert "DeepStream preprocessing on the host" in (trained_run / "summary.md").read_text()
    # nvinfer's model: the bundle's logits through a Softmax
    x = np.random.default_rng(0).normal(size=(4, 3, h, w)).astype(np.float32)
    assert _run(folder / "model.onnx", x) == pytest.approx(_softmax(_run(bundle / "model.onnx", x)), abs=1e-5)


def test_uniform_std_gives_nvinfers_exact_normalization():
    spec = PreprocessSpec(resize=8, crop=8, mean=(0.5, 0.4, 0.3), std=(0.25, 0.25, 0.25))
    params = nvinfer.parameters(spec, folded=False)
    assert params["exact"] and params["net_scale_factor"] == pytest.approx(1 / 255 / 0.25)
    image = np.random.default_rng(1).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    ours = normalize(image[None], spec)
    theirs = nvinfer.ds_preprocess([image], (8, 8), params, "bilinear", "RGB")
    assert theirs == pytest.approx(ours, abs=1e-5)  # y = net-scale-factor * (x - offsets) is edgerun's normalize


def test_per_channel_std_is_approximate_and_said_so_folding_makes_it_exact(trained_run, tmp_path):
    spec = PreprocessSpec(resize=8, crop=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    params = nvinfer.parameters(spec, folded=False)
    assert not params["exact"] and "APPROXIMATE" in params["note"] and "export.input: uint8" in params["note"]
    bundle = trained_run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    n, c, h, w = manifest["model"]["input_shape"]
    folded = tmp_path / "folded.onnx"
    nvinfer.deepstream_model(bundle / "model.onnx", folded, spec, True, "input", "logits")
    assert onnx.load(str(folded)).graph.input[0].name == "pixels"
    pixels = np.random.default_rng(2).integers(0, 256, size=(3, h, w, 3), dtype=np.uint8)
    exact = _softmax(_run(bundle / "model.onnx", normalize(pixels, spec)))
    fed = nvinfer.ds_preprocess(list(pixels), (h, w), nvinfer.parameters(spec, folded=True), "bilinear", "RGB")
    assert fed.max() > 200  # raw pixel values go in
    assert _run(folded, fed) == pytest.approx(exact, abs=1e-5)


def test_sources_map_to_deepstream_app_types():
    cam = (1920, 1080, 30)
    assert deepstream.source_group("csi://1", cam)["camera-csi-sensor-id"] == 1
    assert deepstream.source_group("/dev/video2", cam)["camera-v4l2-dev-node"] == 2
    assert deepstream.source_group("usb://0", cam)["type"][0] == 1
    assert deepstream.source_group("rtsp://cam/line", cam)["uri"] == "rtsp://cam/line"
    assert deepstream.source_group("/data/line.mp4", cam)["uri"] == "file:///data/line.mp4"
    assert deepstream.parse_camera("1280x720@60") == (1280, 720, 60)
    with pytest.raises(ExportError, match="deepstream_camera"):
        deepstream.parse_camera("720p")


def test_unknown_key_and_separator_in_a_class_name_are_refused(trained_run, tmp_path):
    bad = tmp_path / "c.txt"
    bad.write_text("[property]\nonnx-file=m.onnx\nnet-scale-factr=1\n")
    with pytest.raises(ExportError, match="net-scale-factr"):
        deepstream.check_config(bad)
    with pytest.raises(ExportError, match="';'"):
        deepstream.write(_job(trained_run, tmp_path, classes=["good", "bad;scratch"]))


def _nvinfer_engine(prop: dict[str, str]) -> str:
    """The engine nvinfer builds for a [property] group (nvdsinfer_model_builder.cpp, DeepStream 6.0 ... 7.x):
    INT8 only with an int8-calib-file, else FP16 in its place; named <model>_b<batch>_gpu<id>_<precision>.engine."""
    mode = {"0": "fp32", "1": "int8", "2": "fp16"}[prop["network-mode"]]
    if mode == "int8" and not prop.get("int8-calib-file"):
        mode = "fp16"  # "INT8 calibration file not specified. Trying FP16 mode."
    return f"{prop['onnx-file']}_b{prop['batch-size']}_gpu{prop['gpu-id']}_{mode}.engine"


def _job(trained_run, tmp_path, **changes):
    manifest = json.loads((trained_run / "bundle" / "manifest.json").read_text())
    job = dict(
        folder=tmp_path / "ds",
        bundle_model=trained_run / "bundle" / "model.onnx",
        manifest_model=manifest["model"],
        classes=manifest["classes"],
        spec=PreprocessSpec.from_dict(manifest["preprocess"]),
        folded=False,
        batch=1,
        int8_file=None,
        decision=None,
        source="csi://0",
        camera="1280x720@30",
        name="t",
    )
    job.update(changes)
    return deepstream.DeepStreamJob(**job)


def test_every_config_names_the_engine_nvinfer_builds_and_no_int8_config_without_a_calibration_file(
    trained_run, tmp_path
):
    bundle = trained_run / "bundle"
    facts = deepstream.write(_job(trained_run, tmp_path, int8_file=bundle / "model.onnx"))  # an INT8 model passed
    configs = sorted((tmp_path / "ds").glob("ds*/config_infer_primary*.txt"))
    assert len(configs) == 4  # FP16 and FP32 for each release
    for config in configs:
        prop = deepstream.check_config(config)
        assert prop["model-engine-file"] == _nvinfer_engine(prop), config  # found at the next start, not rebuilt
    assert "int8" not in facts["precisions"] and "int8-calib-file" in facts["int8"]
    assert "edgerun build --precision int8" in facts["int8"]
    assert not (tmp_path / "ds" / "model.int8.onnx").exists()


def test_the_host_measurement_uses_the_filter_nvinfer_applies():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(37, 29, 3), dtype=np.uint8)
    params = {"offsets": [0.0, 0.0, 0.0], "net_scale_factor": 1.0}
    area = nvinfer.ds_preprocess([image], (8, 8), params, "area", "RGB")
    bilinear = nvinfer.ds_preprocess([image], (8, 8), params, "bilinear", "RGB")
    assert np.array_equal(area, bilinear)  # the GPU scaler has no area filter: nvinfer scales bilinearly
    spec = PreprocessSpec(resize=8, crop=8, interpolation="area")
    job = deepstream.DeepStreamJob(
        Path("."),
        Path("m.onnx"),
        {"input_shape": [1, 3, 8, 8]},
        ["a", "b"],
        spec,
        False,
        1,
        None,
        None,
        "csi://0",
        "1280x720@30",
        "t",
    )
    prop = deepstream._infer_config(
        job,
        "fp16",
        "model.onnx",
        nvinfer.parameters(spec, False),
        "7",
        deepstream.NVINFER_KEYS_7,
    )
    assert prop["scaling-filter"][0] == 1  # NvBufSurfTransform_Inter_Bilinear


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"classes": ["good", "bad\nmodel-engine-file=/tmp/evil.engine"]}, "line break"),
        ({"source": "rtsp://cam/line\n[source1]\nuri=file:///etc/passwd"}, "line break"),
        ({"source": "csi://abc"}, "whole number"),
        ({"name": "line\n[primary-gie]"}, "line break"),
    ],
)
def test_values_that_would_inject_keys_or_break_the_config_are_refused(trained_run, tmp_path, changes, match):
    with pytest.raises(ExportError, match=match):
        deepstream.write(_job(trained_run, tmp_path, **changes))
    assert not list((tmp_path / "ds").glob("ds*/*.txt"))  # nothing half-written to ship


def test_the_recipe_refuses_a_deepstream_source_it_cannot_write():
    from edgedistill.recipe.outputs import ExportConfig

    with pytest.raises(ValueError, match="whole number"):
        ExportConfig(deepstream_source="csi://abc")
    with pytest.raises(ValueError, match="line break"):
        ExportConfig(deepstream_source="/dev/video0\n[sink1]")
    assert ExportConfig(deepstream_source="usb://1").deepstream_source == "usb://1"
