"""TensorRT build and runner control flow against fakes of the 8.2 and 10.x APIs (no GPU here)."""

import json
import shutil

import numpy as np
import pytest
from fake_tensorrt import DLA_OPS, FakeCuda, make_fake_trt

from edgerun.bundle.bundle import open_bundle
from edgerun.errors import EngineBuildError, EngineMismatchError
from edgerun.preprocess import preprocess
from edgerun.profiles import get_target, parse_version
from edgerun.runtime.runners import OrtRunner
from edgerun.runtime.trt import _Api8, _Api10, check_engine, make_logger, select_api
from edgerun.runtime.trt_build import BuildSpec, build_engine
from edgerun.runtime.trt_run import TrtRunner

NANO = {"name": "Jetson Nano", "compute_capability": "5.3"}
ORIN = {"name": "Orin", "compute_capability": "8.7"}
XAVIER = {"name": "Xavier", "compute_capability": "7.2"}


def _untrained_bundle(folder, name, **export):
    """A bundle of an untrained MobileNetV3 on a few real digits, exported with ``ExportConfig(**export)``."""
    from edgedistill.data.sources import load_data
    from edgedistill.models.factory import create_model
    from edgedistill.recipe.outputs import ExportConfig
    from edgedistill.recipe.sections import DataConfig, ModelConfig
    from edgedistill.ship.export import ExportJob, build_bundle

    cfg = DataConfig(source="digits", image_size=32, train_per_class=10, val_per_class=4)
    data = load_data(cfg)
    (folder / "ckpt").write_bytes(b"x")
    build_bundle(
        ExportJob(
            model=create_model(ModelConfig(model="mobilenetv3_small_050"), 10).eval(),
            out_dir=folder / "bundle",
            name=name,
            classes=data.classes,
            train=data.train,
            val=data.val,
            data_cfg=cfg,
            cfg=ExportConfig(calib_samples=16, val_samples=20, parity_samples=20, **export),
            seed=0,
            checkpoint=folder / "ckpt",
            source={},
            host_metrics={},
            recipe_yaml="name: %s\n" % name,
        )
    )
    return open_bundle(folder / "bundle")


@pytest.fixture(scope="module")
def orin_bundle(tmp_path_factory):
    """A bundle exported for a TensorRT 10 target; like every bundle it carries the explicit-quantization model."""
    return _untrained_bundle(tmp_path_factory.mktemp("orin"), "orin", target="jetson-orin-nano-jp6")


def _older_bundle(bundle, folder):
    """A copy of ``bundle`` as bundles were before explicit quantization for every TensorRT: no Q/DQ variant."""
    import shutil

    from edgerun.bundle.manifest import write_manifest

    shutil.copytree(bundle.folder, folder)
    data = json.loads((folder / "manifest.json").read_text())
    (folder / data["variants"].pop("int8")["file"]).unlink()
    write_manifest(str(folder), data)
    return open_bundle(folder)


def test_versions_compare_as_numbers_and_pick_the_api():
    assert parse_version("8.10.0") > parse_version("8.9.1")  # as strings, "8.10" < "8.9"
    assert parse_version("10.3.0.30") >= (10,) > parse_version("8.6.2")
    assert isinstance(select_api(make_fake_trt("8.2.1.8")), _Api8)
    assert isinstance(select_api(make_fake_trt("8.5.2")), _Api8)
    assert isinstance(select_api(make_fake_trt("10.3.0")), _Api10)
    with pytest.raises(EngineBuildError, match="too old"):
        select_api(make_fake_trt("7.1.3"))
    # a real JetPack 4.6 board (L4T R32.6.1) has TensorRT 8.0.1: refused, saying which release works, not "4.6"
    with pytest.raises(EngineBuildError, match=r"JetPack 4.6 \(L4T R32.6.1\) ships TensorRT 8.0.1.*JetPack 4.6.1"):
        select_api(make_fake_trt("8.0.1.6"))


def test_build_on_tensorrt_8_2_uses_max_workspace_size_and_explicit_batch(trained_run, tmp_path):
    trt = make_fake_trt("8.2.1.8", fast_int8=False)
    bundle = open_bundle(trained_run / "bundle")
    out = tmp_path / "s.fp16.engine"
    meta = build_engine(
        bundle,
        BuildSpec(precision="fp16", output=str(out), workspace_mb=256, timing_cache=str(tmp_path / "tc"), gpu=NANO),
        trt=trt,
        log=lambda m: None,
        cuda=FakeCuda(),
    )
    assert ("create_network", 1) in trt.calls and ("max_workspace_size", 256 << 20) in trt.calls
    assert not any(c[0] == "set_memory_pool_limit" for c in trt.calls if isinstance(c, tuple))
    assert ("build", ["FP16"], 256 << 20) in trt.calls
    on_disk = json.loads((tmp_path / "s.fp16.engine.json").read_text())
    assert on_disk == meta and meta["tensorrt"] == "8.2.1.8" and meta["precision"] == "fp16"
    assert meta["compute_capability"] == "5.3" and len(meta["bundle_sha256"]) == 64
    # the persistent timing cache, written back under this board's and TensorRT's name
    assert (tmp_path / "tc.jetson-nano.trt8.2.1.8.cache").read_bytes() == b"FAKE-TIMING-CACHE:8.2.1.8"


def test_build_on_tensorrt_10_uses_memory_pool_and_qdq_for_int8(orin_bundle, tmp_path):
    trt = make_fake_trt("10.3.0")
    if orin_bundle.manifest.variant("int8")["status"] == "rejected":  # an untrained model may lose > 1 point
        with pytest.raises(EngineBuildError, match="rejected on the host"):
            build_engine(
                orin_bundle,
                BuildSpec(precision="int8", output=str(tmp_path / "o.int8.engine"), gpu=ORIN),
                trt=trt,
                log=lambda m: None,
                cuda=FakeCuda(),
            )
    meta = build_engine(
        orin_bundle,
        BuildSpec(precision="int8", output=str(tmp_path / "o.int8.engine"), gpu=ORIN, force=True),
        trt=trt,
        log=lambda m: None,
        cuda=FakeCuda(),
    )
    assert ("create_network", 0) in trt.calls and ("set_memory_pool_limit", 1024 << 20) in trt.calls
    assert meta["onnx"] == "model.int8.onnx" and "calibrate" not in trt.calls  # explicit quantization
    assert meta["explicit_quantization"] is True
    assert ("build", ["FP16", "INT8"], 1024 << 20) in trt.calls


def test_tensorrt_10_int8_of_an_older_bundle_without_qdq_is_refused(trained_run, tmp_path):
    older = _older_bundle(open_bundle(trained_run / "bundle"), tmp_path / "older")
    with pytest.raises(EngineBuildError, match="explicit-quantization.*re-export"):
        build_engine(
            older,
            BuildSpec(precision="int8", output=str(tmp_path / "e"), gpu=ORIN),
            trt=make_fake_trt("10.3.0"),
            log=lambda m: None,
            cuda=FakeCuda(),
        )


@pytest.mark.parametrize("version", ["8.2.1.8", "8.5.2", "10.3.0"])
def test_int8_builds_from_the_explicit_model_without_a_calibrator_on_every_tensorrt(trained_run, tmp_path, version):
    bundle = open_bundle(trained_run / "bundle")
    cuda = FakeCuda()
    trt = make_fake_trt(version, cuda=cuda)
    engine = str(tmp_path / "e.engine")
    meta = build_engine(
        bundle,
        BuildSpec(precision="int8", output=engine, force=True, gpu=XAVIER),
        trt=trt,
        cuda=cuda,
        log=lambda m: None,
    )
    assert meta["onnx"] == "model.int8.onnx" and meta["explicit_quantization"] is True
    assert "calibrate" not in trt.calls and trt.state["calibration"] == []
    assert any(c[0] == "build" and "INT8" in c[1] and "FP16" in c[1] for c in trt.calls if isinstance(c, tuple))
    images, _ = bundle.validation()  # the engine computes what the Q/DQ model computes on the host
    feed = preprocess(images[:1], bundle.manifest.preprocess)
    with TrtRunner(engine, bundle=bundle, trt=trt, cuda=cuda, gpu=XAVIER) as runner:
        got = runner.infer({"input": feed})["logits"]
    with OrtRunner(bundle.variant_path("int8")) as ort_runner:
        want = ort_runner.infer({"input": feed})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int8_refused_on_nano_unless_forced_and_older_bundles_calibrate_from_calib_npy(trained_run, tmp_path):
    bundle = open_bundle(trained_run / "bundle")
    with pytest.raises(EngineBuildError, match=r"INT8 refused on Jetson Nano \(compute capability 5.3\).*--force"):
        build_engine(
            bundle,
            BuildSpec(precision="int8", output=str(tmp_path / "e"), gpu=NANO),
            trt=make_fake_trt("8.2.1.8", fast_int8=False),
            cuda=FakeCuda(),
        )
    with pytest.raises(EngineBuildError, match="--force INT8 cannot work on Jetson Nano: .*explicit quantization"):
        build_engine(  # the Q/DQ model cannot be built without INT8 kernels: said before TensorRT fails on it
            bundle,
            BuildSpec(precision="int8", output=str(tmp_path / "e"), gpu=NANO, force=True),
            trt=make_fake_trt("8.2.1.8", fast_int8=False),
            cuda=FakeCuda(),
        )
    older = _older_bundle(bundle, tmp_path / "older")
    cuda = FakeCuda()
    trt = make_fake_trt("8.2.1.8", fast_int8=False, cuda=cuda)
    meta = build_engine(
        older,
        BuildSpec(precision="int8", output=str(tmp_path / "e.engine"), force=True, gpu=NANO),
        trt=trt,
        cuda=cuda,
        log=lambda m: None,
    )
    assert "calibrate" in trt.calls and trt.state["calibration_batch"] == 1 and meta["explicit_quantization"] is False
    (cache,) = tmp_path.glob("e.engine.calib-*-b1.cache")
    assert cache.read_bytes() == b"CALIBCACHE"


def test_dla_is_refused_on_a_nano_and_lists_the_layers_that_fall_back_on_xavier_and_orin(trained_run, tmp_path):
    bundle = open_bundle(trained_run / "bundle")
    with pytest.raises(EngineBuildError, match="Jetson Nano 4GB has no Deep Learning Accelerator"):
        build_engine(
            bundle,
            BuildSpec(
                precision="fp16", output=str(tmp_path / "n"), dla_core=0, gpu=NANO, target=get_target("jetson-nano-jp4")
            ),
            trt=make_fake_trt("8.2.1.8", dla_cores=0),
            cuda=FakeCuda(),
        )
    for version, board in (("8.5.2", "agx-xavier-jp5"), ("10.3.0", "agx-orin-jp6")):
        trt = make_fake_trt(version, dla_cores=2)
        with pytest.raises(EngineBuildError, match=r"\d+ layer\(s\) cannot run on the DLA.*--gpu-fallback"):
            build_engine(
                bundle,
                BuildSpec(
                    precision="fp16", output=str(tmp_path / "x"), dla_core=1, gpu=XAVIER, target=get_target(board)
                ),
                trt=trt,
                cuda=FakeCuda(),
                log=lambda m: None,
            )
        with pytest.raises(EngineBuildError, match="has 2 DLA core"):
            build_engine(
                bundle,
                BuildSpec(precision="fp16", output=str(tmp_path / "x"), dla_core=2, gpu=XAVIER),
                trt=trt,
                cuda=FakeCuda(),
            )
        with pytest.raises(EngineBuildError, match="not FP32"):
            build_engine(
                bundle,
                BuildSpec(precision="fp32", output=str(tmp_path / "x"), dla_core=0, gpu=XAVIER),
                trt=trt,
                cuda=FakeCuda(),
            )
        meta = build_engine(
            bundle,
            BuildSpec(
                precision="fp16",
                output=str(tmp_path / f"{board}.engine"),
                dla_core=1,
                gpu_fallback=True,
                gpu=XAVIER,
                target=get_target(board),
            ),
            trt=trt,
            cuda=FakeCuda(),
            log=lambda m: None,
        )
        import onnx

        unsupported = [n.name for n in onnx.load(bundle.model_path).graph.node if n.op_type not in DLA_OPS]
        assert meta["dla"] == {"core": 1, "gpu_fallback": True, "gpu_layers": unsupported, "batch": 1} and unsupported
        assert ("dla", 1) in trt.calls
        assert any(c[0] == "build" and "GPU_FALLBACK" in c[1] for c in trt.calls if isinstance(c, tuple))


def test_out_of_memory_retries_with_half_the_workspace_then_points_at_swap(trained_run, tmp_path):
    bundle = open_bundle(trained_run / "bundle")
    messages = []
    trt = make_fake_trt("8.2.1.8", oom_times=1)
    meta = build_engine(
        bundle,
        BuildSpec(precision="fp16", output=str(tmp_path / "a.engine"), workspace_mb=512, gpu=NANO),
        trt=trt,
        log=messages.append,
        cuda=FakeCuda(),
    )
    assert trt.state["workspaces"] == [512 << 20, 256 << 20] and meta["workspace_mb"] == 256
    assert any("retrying with a 256 MB workspace" in m for m in messages)
    with pytest.raises(EngineBuildError, match="out of memory twice.*swap"):
        build_engine(
            bundle,
            BuildSpec(precision="fp16", output=str(tmp_path / "b.engine"), workspace_mb=512, gpu=NANO),
            trt=make_fake_trt("8.2.1.8", oom_times=2),
            log=lambda m: None,
            cuda=FakeCuda(),
        )
    assert not (tmp_path / "b.engine").exists()


def test_parser_errors_name_the_node(trained_run, tmp_path):
    trt = make_fake_trt("8.2.1.8", parse_error=(17, "Unsupported ONNX data type: UINT8"))
    with pytest.raises(EngineBuildError, match="node 17: Unsupported ONNX data type"):
        build_engine(
            open_bundle(trained_run / "bundle"),
            BuildSpec(precision="fp16", output=str(tmp_path / "e"), gpu=NANO),
            trt=trt,
            cuda=FakeCuda(),
        )


@pytest.mark.parametrize(
    "version,execute", [("8.2.1.8", "execute_async_v2"), ("8.5.2", "execute_async_v2"), ("10.3.0", "execute_async_v3")]
)
def test_runner_matches_onnxruntime_on_both_generations(trained_run, tmp_path, version, execute):
    bundle = open_bundle(trained_run / "bundle")
    cuda = FakeCuda()
    trt = make_fake_trt(version, cuda=cuda)
    engine = str(tmp_path / "s.engine")
    build_engine(bundle, BuildSpec(precision="fp16", output=engine, gpu=NANO), trt=trt, log=lambda m: None, cuda=cuda)
    images, _ = bundle.validation()
    feed = preprocess(images[:1], bundle.manifest.preprocess)
    with TrtRunner(engine, bundle=bundle, trt=trt, cuda=cuda, gpu=NANO) as runner:
        got = runner.infer({"input": feed})["logits"]
        timing = runner.last_timing
    with OrtRunner(bundle.model_path) as ort_runner:
        want = ort_runner.infer({"input": feed})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert execute in trt.calls and set(timing) == {"h2d", "compute", "d2h"}
    assert "pagelocked_empty" in cuda.calls and "memcpy_htod_async" in cuda.calls


def test_engines_from_another_version_device_or_bundle_are_refused(trained_run, tmp_path):
    bundle = open_bundle(trained_run / "bundle")
    engine = str(tmp_path / "s.engine")
    build_engine(
        bundle,
        BuildSpec(precision="fp16", output=engine, gpu=NANO),
        trt=make_fake_trt("8.2.1.8"),
        log=lambda m: None,
        cuda=FakeCuda(),
    )
    check_engine(engine, bundle, make_fake_trt("8.2.1.8"), NANO)  # same everything: accepted
    with pytest.raises(EngineMismatchError, match="built with TensorRT 8.2.1.8, this device has 8.5.2.*edgerun build"):
        TrtRunner(engine, bundle=bundle, trt=make_fake_trt("8.5.2"), cuda=FakeCuda(), gpu=NANO).activate()
    with pytest.raises(EngineMismatchError, match="compute capability 5.3.*rebuild"):
        check_engine(engine, bundle, make_fake_trt("8.2.1.8"), ORIN)
    other = tmp_path / "other"
    shutil.copytree(trained_run / "bundle", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"] = "changed"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="another bundle"):
        check_engine(engine, open_bundle(other), make_fake_trt("8.2.1.8"), NANO)
    (tmp_path / "s.engine.json").unlink()
    with pytest.raises(EngineMismatchError, match="origin is unknown"):
        check_engine(engine, bundle, make_fake_trt("8.2.1.8"), NANO)
    from edgerun.runtime.engine_record import device_key, seal

    (tmp_path / "junk.engine").write_bytes(b"garbage")  # sealed by this device, yet not an engine
    (tmp_path / "junk.engine.json").write_text(json.dumps(seal({"tensorrt": "8.2.1.8"}, b"garbage", device_key())))
    with pytest.raises(EngineMismatchError, match="could not deserialize"):
        TrtRunner(str(tmp_path / "junk.engine"), trt=make_fake_trt("8.2.1.8"), cuda=FakeCuda()).activate()


def test_an_engine_swapped_or_a_record_edited_is_refused(trained_run, tmp_path):
    """The signed bundle does not cover the engine: its record does, with the engine's sha256 sealed by the device
    key. Before, any engine ran under a trusted bundle as long as its .engine.json named the bundle's hash."""
    import os
    import stat

    from edgerun.runtime.engine_record import device_key_path

    bundle = open_bundle(trained_run / "bundle")
    cuda = FakeCuda()
    trt = make_fake_trt("8.2.1.8", cuda=cuda)
    engine = tmp_path / "s.engine"
    meta = build_engine(
        bundle, BuildSpec(precision="fp16", output=str(engine), gpu=NANO), trt=trt, log=lambda m: None, cuda=cuda
    )
    assert len(meta["engine_sha256"]) == 64 and meta["record_hmac"]
    assert stat.S_IMODE(os.stat(device_key_path()).st_mode) == 0o600
    with TrtRunner(str(engine), bundle=bundle, trt=trt, cuda=cuda, gpu=NANO) as runner:
        assert runner.meta["engine_sha256"] == meta["engine_sha256"]
    other = tmp_path / "other.engine"  # another engine (the INT8 one, from the Q/DQ model), its record copied over
    build_engine(
        bundle,
        BuildSpec(precision="int8", output=str(other), force=True, gpu=NANO),
        trt=trt,
        log=lambda m: None,
        cuda=cuda,
    )
    assert other.read_bytes() != engine.read_bytes()
    shutil.copy(other, tmp_path / "swapped.engine")
    shutil.copy(str(engine) + ".json", tmp_path / "swapped.engine.json")
    with pytest.raises(EngineMismatchError, match="is not the engine its record describes"):
        TrtRunner(str(tmp_path / "swapped.engine"), bundle=bundle, trt=trt, cuda=cuda, gpu=NANO).activate()
    edited = json.loads((tmp_path / "other.engine.json").read_text())
    edited["precision"] = "fp16"  # a record rewritten without the device key
    (tmp_path / "other.engine.json").write_text(json.dumps(edited))
    with pytest.raises(EngineMismatchError, match="not sealed by this device's key"):
        TrtRunner(str(other), bundle=bundle, trt=trt, cuda=cuda, gpu=NANO).activate()
    unsealed = {k: v for k, v in meta.items() if k not in ("record_hmac", "engine_sha256")}
    (tmp_path / "old.engine").write_bytes(engine.read_bytes())
    (tmp_path / "old.engine.json").write_text(json.dumps(unsealed))  # as older edgerun releases wrote it
    with pytest.raises(EngineMismatchError, match="unsealed record"):
        TrtRunner(str(tmp_path / "old.engine"), bundle=bundle, trt=trt, cuda=cuda, gpu=NANO).activate()


def test_build_cli_names_the_engine_after_the_bundle_file(trained_run, tmp_path, monkeypatch, capsys):
    import edgerun.cli as cli
    import edgerun.device as device
    import edgerun.runtime.trt as trt_module
    from edgerun.bundle.bundle import pack_bundle

    edb = pack_bundle(trained_run / "bundle", tmp_path / "student.edb")
    fake = make_fake_trt("8.2.1.8", fast_int8=False)
    monkeypatch.setattr(trt_module, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_module, "import_cuda", FakeCuda)
    monkeypatch.setattr(device, "gpu_properties", lambda: NANO)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["build", edb, "--precision", "fp16"]) == 0
    assert (tmp_path / "student.fp16.engine").exists() and (tmp_path / "student.fp16.engine.json").exists()
    assert cli.main(["build", edb, "--precision", "int8"]) == 2  # Nano: no fast INT8
    assert "INT8 refused" in capsys.readouterr().err
    assert cli.main(["build", edb, "--precision", "fp16", "--dla", "0"]) == 2  # the Nano has no DLA
    assert "no Deep Learning Accelerator" in capsys.readouterr().err


def test_tensorrt_qdq_model_follows_explicit_quantization_rules(orin_bundle):
    """TensorRT's ONNX parser takes only 8-bit Q/DQ with zero point 0, per-channel on axis 0 for conv weights (float
    weights behind a Q/DQ pair, which it quantizes with the Q scale), and folds FP32 biases itself: an INT32 bias
    DequantizeLinear is rejected. Checked here without quantize.qdq_violations, which the export already applies."""
    import onnx
    from onnx import numpy_helper

    variant = orin_bundle.manifest.variant("int8")
    graph = onnx.load(orin_bundle.path(variant["file"])).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "the model has no Q/DQ nodes"
    producer = {o: n for n in graph.node for o in n.output}
    conv_weights = 0
    for node in qdq:
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), "%s: zero point %s" % (node.name, zero)
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:  # a weight
            weight, scale = inits[node.input[0]], inits[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            assert axis == 0 and scale.shape == (weight.shape[0],), node.name
            codes = np.round(weight / scale.reshape((-1,) + (1,) * (weight.ndim - 1)))
            assert codes.min() >= -127 and codes.max() <= 127  # symmetric: -128 never used
    for node in graph.node:
        if node.op_type == "Conv":
            weight_dq = producer[node.input[1]]
            assert weight_dq.op_type == "DequantizeLinear" and producer[weight_dq.input[0]].op_type == "QuantizeLinear"
            conv_weights += 1
            if len(node.input) > 2:
                assert node.input[2] in inits, "%s: the bias must stay a float constant" % node.name
    assert conv_weights > 10


@pytest.fixture(scope="module")
def dynamic_bundle(tmp_path_factory):
    """A bundle with a dynamic batch (profile 1..4, opt 4) for a TensorRT 8 target."""
    return _untrained_bundle(
        tmp_path_factory.mktemp("dynamic"),
        "dyn",
        target="jetson-nano-jp4",
        dynamic_batch=True,
        batch=4,
        max_batch=4,
        int8=False,
    )


def _feed(bundle, n):
    images, _ = bundle.validation()
    return {"input": preprocess(images[:n], bundle.manifest.preprocess)}


@pytest.mark.parametrize("version", ["8.2.1.8", "10.3.0"])
def test_a_feed_the_engine_cannot_take_is_refused_not_truncated(trained_run, dynamic_bundle, tmp_path, version):
    """bench --batch 8 on a batch-1 engine used to copy 8 images, compute 1 and report 8x the FPS."""
    from edgerun.errors import RunnerError

    cuda = FakeCuda()
    trt = make_fake_trt(version, cuda=cuda)
    fixed = open_bundle(trained_run / "bundle")
    build_engine(
        fixed, BuildSpec(precision="fp16", output=str(tmp_path / "f.engine")), trt=trt, cuda=cuda, log=lambda m: None
    )
    with TrtRunner(str(tmp_path / "f.engine"), bundle=fixed, trt=trt, cuda=cuda) as runner:
        assert runner.infer(_feed(fixed, 1))["logits"].shape == (1, 10)
        with pytest.raises(RunnerError, match=r"fixed at \(1, 3, 16, 16\), the feed is \(8, 3, 16, 16\).*feed batch 1"):
            runner.infer(_feed(fixed, 8))
    build_engine(
        dynamic_bundle,
        BuildSpec(precision="fp16", output=str(tmp_path / "d.engine")),
        trt=trt,
        cuda=cuda,
        log=lambda m: None,
    )
    with TrtRunner(str(tmp_path / "d.engine"), bundle=dynamic_bundle, trt=trt, cuda=cuda) as runner:
        assert runner.infer(_feed(dynamic_bundle, 3))["logits"].shape == (3, 10)
        with pytest.raises(RunnerError, match="refused input shape .*outside its optimization profile"):
            runner.infer(_feed(dynamic_bundle, 6))  # the setter returned False: checked, not ignored


def test_runner_works_from_another_thread_in_the_primary_context(trained_run, tmp_path):
    import threading

    cuda = FakeCuda()
    trt = make_fake_trt("10.3.0", cuda=cuda)
    bundle = open_bundle(trained_run / "bundle")
    build_engine(
        bundle, BuildSpec(precision="fp16", output=str(tmp_path / "e.engine")), trt=trt, cuda=cuda, log=lambda m: None
    )
    results = {}
    with TrtRunner(str(tmp_path / "e.engine"), bundle=bundle, trt=trt, cuda=cuda) as runner:
        main_thread = runner.infer(_feed(bundle, 1))["logits"]
        worker = threading.Thread(target=lambda: results.update(runner.infer(_feed(bundle, 1))))
        worker.start()
        worker.join()
    np.testing.assert_array_equal(results["logits"], main_thread)
    assert cuda.calls.count("ctx.push") == cuda.calls.count("ctx.pop") >= 2


def test_builder_needs_the_cuda_context_first(trained_run, tmp_path, monkeypatch):
    """The primary context is made current before TensorRT touches CUDA (import_cuda before trt.Builder)."""
    import edgerun.runtime.trt as trt_module

    order = []
    cuda = FakeCuda()
    monkeypatch.setattr(trt_module, "import_cuda", lambda: order.append("cuda") or cuda)
    monkeypatch.setattr(
        trt_module, "import_tensorrt", lambda: order.append("tensorrt") or make_fake_trt("8.2.1.8", cuda=cuda)
    )
    build_engine(
        open_bundle(trained_run / "bundle"),
        BuildSpec(precision="fp16", output=str(tmp_path / "e.engine")),
        log=lambda m: None,
    )
    assert order == ["cuda", "tensorrt"]


def test_calibration_cache_belongs_to_one_bundle(trained_run, tmp_path):
    """Bundles without the explicit-quantization model (older releases) are calibrated on TensorRT 8.x."""
    bundle = _older_bundle(open_bundle(trained_run / "bundle"), tmp_path / "older")
    out = str(tmp_path / "e.engine")
    cuda = FakeCuda()
    trt = make_fake_trt("8.2.1.8", cuda=cuda)
    build_engine(bundle, BuildSpec(precision="int8", output=out, force=True), trt=trt, cuda=cuda, log=lambda m: None)
    build_engine(bundle, BuildSpec(precision="int8", output=out, force=True), trt=trt, cuda=cuda, log=lambda m: None)
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "older", changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["name"] = "retrained"
    (changed / "manifest.json").write_text(json.dumps(manifest))
    build_engine(
        open_bundle(changed),
        BuildSpec(precision="int8", output=out, force=True),
        trt=trt,
        cuda=cuda,
        log=lambda m: None,
    )
    assert trt.state["calibration"] == ["calibrated", "cache hit", "calibrated"]  # no stale scales
    assert len(list(tmp_path.glob("e.engine.calib-*.cache"))) == 2


def test_dynamic_int8_on_tensorrt_8_sets_the_calibration_profile(dynamic_bundle, tmp_path):
    cuda = FakeCuda()
    trt = make_fake_trt("8.5.2", cuda=cuda)
    build_engine(
        dynamic_bundle,
        BuildSpec(precision="int8", output=str(tmp_path / "d.engine")),
        trt=trt,
        cuda=cuda,
        log=lambda m: None,
    )
    assert "set_calibration_profile" in trt.calls and trt.state["calibration_batch"] == 4  # the profile's opt
    assert list(tmp_path.glob("d.engine.calib-*-b4-dyn1-4-4.cache"))


def test_execution_context_failure_is_an_error_not_a_crash_later(trained_run, tmp_path):
    from edgerun.errors import RunnerError

    cuda = FakeCuda()
    trt = make_fake_trt("8.2.1.8", cuda=cuda, context_fails=True)
    bundle = open_bundle(trained_run / "bundle")
    build_engine(
        bundle, BuildSpec(precision="fp16", output=str(tmp_path / "e.engine")), trt=trt, cuda=cuda, log=lambda m: None
    )
    with pytest.raises(RunnerError, match="could not create an execution context.*out of device memory"):
        TrtRunner(str(tmp_path / "e.engine"), bundle=bundle, trt=trt, cuda=cuda).activate()


def test_engines_are_matched_to_the_board_model(trained_run, tmp_path):
    bundle = open_bundle(trained_run / "bundle")
    engine = str(tmp_path / "e.engine")
    orin_nano = "NVIDIA Jetson Orin Nano Developer Kit"
    meta = build_engine(
        bundle,
        BuildSpec(precision="fp16", output=engine, gpu=ORIN, board=orin_nano),
        trt=make_fake_trt("10.3.0"),
        cuda=FakeCuda(),
        log=lambda m: None,
    )
    assert meta["board"] == orin_nano
    check_engine(engine, bundle, make_fake_trt("10.3.0"), ORIN, board=orin_nano)
    with pytest.raises(EngineMismatchError, match="built on a NVIDIA Jetson Orin Nano.*Jetson AGX Orin"):
        check_engine(engine, bundle, make_fake_trt("10.3.0"), ORIN, board="Jetson AGX Orin")  # both 8.7


def test_a_jetson_that_cannot_see_its_model_refuses_a_board_engine(trained_run, tmp_path, monkeypatch):
    """In a container /proc/device-tree is masked: a Jetson that cannot name itself must not run an engine tuned
    to a board, and the error says which mount fixes it."""
    import edgerun.runtime.trt as trt_module

    bundle = open_bundle(trained_run / "bundle")
    engine = str(tmp_path / "e.engine")
    build_engine(
        bundle,
        BuildSpec(precision="fp16", output=engine, gpu=ORIN, board="NVIDIA Jetson Orin Nano Developer Kit"),
        trt=make_fake_trt("10.3.0"),
        cuda=FakeCuda(),
        log=lambda m: None,
    )
    monkeypatch.setattr(trt_module, "is_tegra", lambda: True)
    with pytest.raises(EngineMismatchError, match="cannot see its own model.*device-tree/model.*EDGERUN_BOARD"):
        check_engine(engine, bundle, make_fake_trt("10.3.0"), ORIN, board="")
    monkeypatch.setattr(trt_module, "is_tegra", lambda: False)  # a workstation checking a Jetson's engine
    check_engine(engine, bundle, make_fake_trt("10.3.0"), ORIN, board="")


def test_tensorrt_10_parser_errors_name_node_and_operator(trained_run, tmp_path):
    trt = make_fake_trt("10.3.0", parse_error=(17, "no importer", "/blocks/Conv_17", "Conv"))
    with pytest.raises(EngineBuildError, match="node 17 '/blocks/Conv_17' \\(Conv\\): no importer"):
        build_engine(
            open_bundle(trained_run / "bundle"),
            BuildSpec(precision="fp16", output=str(tmp_path / "e")),
            trt=trt,
            cuda=FakeCuda(),
        )


def test_the_timing_cache_is_keyed_by_board_and_tensorrt_and_a_refused_one_is_rebuilt(trained_run, tmp_path):
    """A cache from another TensorRT (set_timing_cache -> False) or a damaged one (create_timing_cache -> None)
    used to end the build in a traceback after the engine was written; now the build goes on without it, and
    each board and version gets its own file."""
    from edgerun.runtime.trt_build import timing_cache_path

    bundle = open_bundle(trained_run / "bundle")
    base = str(tmp_path / "edgerun.timing.cache")
    nano = timing_cache_path(base, "8.2.1.8", "NVIDIA Jetson Nano Developer Kit")
    orin = timing_cache_path(base, "10.3.0", "NVIDIA Jetson Orin Nano Developer Kit")
    assert nano != orin and nano.endswith("edgerun.timing.nvidia-jetson-nano-developer-kit.trt8.2.1.8.cache")
    with open(nano, "wb") as fh:  # a cache written by another TensorRT under this name
        fh.write(b"FAKE-TIMING-CACHE:8.0.1")
    messages = []
    trt = make_fake_trt("8.2.1.8")
    build_engine(
        bundle,
        BuildSpec(
            precision="fp16",
            output=str(tmp_path / "a.engine"),
            timing_cache=base,
            gpu=NANO,
            board="NVIDIA Jetson Nano Developer Kit",
        ),
        trt=trt,
        cuda=FakeCuda(),
        log=messages.append,
    )
    assert any("refused the timing cache" in m for m in messages)
    assert (tmp_path / "a.engine.json").exists() and open(nano, "rb").read() == b"FAKE-TIMING-CACHE:8.2.1.8"
    with open(nano, "wb") as fh:
        fh.write(b"\x00garbage")  # damaged: TensorRT's create_timing_cache returns None
    messages = []
    build_engine(
        bundle,
        BuildSpec(
            precision="fp16",
            output=str(tmp_path / "b.engine"),
            timing_cache=base,
            gpu=NANO,
            board="NVIDIA Jetson Nano Developer Kit",
        ),
        trt=make_fake_trt("8.2.1.8"),
        cuda=FakeCuda(),
        log=messages.append,
    )
    assert any("refused the timing cache" in m for m in messages) and (tmp_path / "b.engine.json").exists()
    assert open(nano, "rb").read() == b"FAKE-TIMING-CACHE:8.2.1.8"
    build_engine(
        bundle,
        BuildSpec(
            precision="fp16",
            output=str(tmp_path / "c.engine"),
            timing_cache=base,
            gpu=ORIN,
            board="NVIDIA Jetson Orin Nano Developer Kit",
        ),
        trt=make_fake_trt("10.3.0"),
        cuda=FakeCuda(),
        log=lambda m: None,
    )
    assert open(orin, "rb").read() == b"FAKE-TIMING-CACHE:10.3.0" and open(nano, "rb").read().endswith(b"8.2.1.8")


def test_a_profile_tensorrt_refuses_is_an_error_not_a_silent_build(dynamic_bundle, tmp_path):
    """add_optimization_profile returns -1 (no exception) for min > opt; set_calibration_profile returns False."""
    bundle = open_bundle(dynamic_bundle.folder)
    bundle.manifest.data["model"]["dynamic_batch"] = {"min": 4, "opt": 2, "max": 4}
    trt = make_fake_trt("8.2.1.8")
    with pytest.raises(EngineBuildError, match="refused the optimization profile.*min 4, opt 2, max 4"):
        build_engine(
            bundle,
            BuildSpec(precision="fp16", output=str(tmp_path / "e"), gpu=NANO),
            trt=trt,
            cuda=FakeCuda(),
            log=lambda m: None,
        )
    assert not (tmp_path / "e").exists()
    builder = trt.Builder(make_logger(trt))
    config, profile = builder.create_builder_config(), builder.create_optimization_profile()
    profile.set_shape("input", (4, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))
    assert config.add_optimization_profile(profile) == -1 and config.set_calibration_profile(profile) is False


def test_tensorrt_8_6_parser_errors_have_no_node_name(trained_run, tmp_path):
    """IParserError.node_name()/node_operator() came with 10.0: on 8.6 the error names the node by index only."""
    trt = make_fake_trt("8.6.1", parse_error=(17, "no importer", "/blocks/Conv_17", "Conv"))
    with pytest.raises(EngineBuildError, match=r"node 17: no importer"):
        build_engine(
            open_bundle(trained_run / "bundle"),
            BuildSpec(precision="fp16", output=str(tmp_path / "e"), gpu=NANO),
            trt=trt,
            cuda=FakeCuda(),
        )


def test_explicit_int8_on_the_dla_is_refused_on_tensorrt_8_and_records_what_runs_where_on_10(trained_run, tmp_path):
    """TensorRT 8.x's DLA runs no Q/DQ: with GPU fallback the INT8 work ran on the GPU while the record said DLA."""
    bundle = open_bundle(trained_run / "bundle")
    trt = make_fake_trt("8.5.2", dla_cores=2)
    for fallback in (False, True):
        with pytest.raises(EngineBuildError, match="8.5.2's DLA does not run the bundle's explicit-quantization"):
            build_engine(
                bundle,
                BuildSpec(
                    precision="int8",
                    output=str(tmp_path / "x"),
                    force=True,
                    dla_core=0,
                    gpu=XAVIER,
                    gpu_fallback=fallback,
                ),
                trt=trt,
                cuda=FakeCuda(),
                log=lambda m: None,
            )
    assert not any(isinstance(c, tuple) and c[0] == "build" for c in trt.calls)  # refused before building
    trt = make_fake_trt("10.3.0", dla_cores=2)
    meta = build_engine(
        bundle,
        BuildSpec(
            precision="int8", output=str(tmp_path / "o.engine"), force=True, dla_core=0, gpu=ORIN, gpu_fallback=True
        ),
        trt=trt,
        cuda=FakeCuda(),
        log=lambda m: None,
    )
    import onnx

    qdq = {n.name for n in onnx.load(bundle.variant_path("int8")).graph.node if "Quantize" in n.op_type}
    assert qdq and not qdq & set(meta["dla"]["gpu_layers"])  # the quantized work is on the DLA, and said so


def test_a_dla_engine_has_a_static_profile_and_its_core_is_set_before_deserializing(dynamic_bundle, tmp_path):
    from edgerun.errors import RunnerError

    bundle = open_bundle(dynamic_bundle.folder)
    cuda = FakeCuda()
    trt = make_fake_trt("8.5.2", dla_cores=2, cuda=cuda)
    engine = str(tmp_path / "d.engine")
    spec = dict(precision="fp16", output=engine, dla_core=1, gpu_fallback=True, gpu=XAVIER)
    meta = build_engine(bundle, BuildSpec(**spec), trt=trt, cuda=cuda, log=lambda m: None)
    assert meta["dla"]["batch"] == 4  # the profile's opt: min = opt = max, which the DLA needs
    with pytest.raises(EngineBuildError, match="--dla-batch 9: the bundle's dynamic batch runs 1 to 4"):
        build_engine(bundle, BuildSpec(dla_batch=9, **spec), trt=trt, cuda=cuda, log=lambda m: None)
    assert (
        build_engine(bundle, BuildSpec(dla_batch=1, **spec), trt=trt, cuda=cuda, log=lambda m: None)["dla"]["batch"]
        == 1
    )
    build_engine(bundle, BuildSpec(dla_batch=4, **spec), trt=trt, cuda=cuda, log=lambda m: None)
    with TrtRunner(engine, bundle=bundle, trt=trt, cuda=cuda, gpu=XAVIER) as runner:
        got = runner.infer(_feed(bundle, 4))["logits"]
        assert got.shape[0] == 4
        with pytest.raises(RunnerError, match="DLA core 1 at batch 4 only.*--dla-batch 2"):
            runner.infer(_feed(bundle, 2))
    assert ("runtime_dla_core", 1) in trt.calls  # set before deserialize, as trtexec does
    runtime = trt.Runtime(make_logger(trt))  # the fake is as strict as that: without the core it refuses
    assert runtime.deserialize_cuda_engine(open(engine, "rb").read()) is None
    raw = trt.Builder(make_logger(trt))
    config = raw.create_builder_config()
    config.default_device_type, config.DLA_core = trt.DeviceType.DLA, 0
    profile = raw.create_optimization_profile()
    profile.set_shape("input", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    config.add_optimization_profile(profile)
    network = raw.create_network(0)
    trt.OnnxParser(network, make_logger(trt)).parse(open(bundle.model_path, "rb").read())
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    assert raw.build_serialized_network(network, config) is None  # a dynamic profile on the DLA: refused


def test_a_container_without_the_board_mount_builds_nothing_and_a_workstation_says_why_no_board(
    trained_run, tmp_path, monkeypatch
):
    """A container build without /proc/device-tree/model wrote "board": null silently: that engine ran anywhere."""
    import edgerun.runtime.trt as trt_module

    bundle = open_bundle(trained_run / "bundle")
    monkeypatch.setattr(trt_module, "board_model", lambda: None)
    monkeypatch.setattr(trt_module, "is_tegra", lambda: True)
    with pytest.raises(EngineBuildError, match="cannot see its own model.*device-tree/model.*EDGERUN_BOARD"):
        build_engine(
            bundle,
            BuildSpec(precision="fp16", output=str(tmp_path / "e.engine"), gpu=ORIN),
            trt=make_fake_trt("10.3.0"),
            cuda=FakeCuda(),
            log=lambda m: None,
        )
    assert not (tmp_path / "e.engine").exists()
    monkeypatch.setattr(trt_module, "is_tegra", lambda: False)
    notes = []
    meta = build_engine(
        bundle,
        BuildSpec(precision="fp16", output=str(tmp_path / "e.engine"), gpu=ORIN),
        trt=make_fake_trt("10.3.0"),
        cuda=FakeCuda(),
        log=notes.append,
    )
    assert meta["board"] is None and any("not a Jetson" in n for n in notes)


def test_a_missing_cuda_driver_library_is_named_not_called_a_missing_pycuda(tmp_path, monkeypatch):
    import sys

    import edgerun.runtime.trt as trt_module
    from edgerun.errors import RunnerError

    package = tmp_path / "pycuda"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "driver.py").write_text(
        "raise ImportError('libcuda.so.1: cannot open shared object file: No such file or directory')\n"
    )
    (package / "autoprimaryctx.py").write_text("import pycuda.driver\n")
    for name in [m for m in sys.modules if m == "pycuda" or m.startswith("pycuda.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RunnerError, match="CUDA driver library is not visible.*libcuda.so.1.*--runtime nvidia"):
        trt_module.import_cuda()
    (package / "driver.py").write_text("")
    (package / "autoprimaryctx.py").write_text("raise ImportError('No module named pycuda._driver')\n")
    for name in [m for m in sys.modules if m == "pycuda" or m.startswith("pycuda.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(RunnerError, match="pycuda is not installed"):
        trt_module.import_cuda()


def test_a_runner_without_a_current_context_says_so(trained_run, tmp_path):
    import threading

    from edgerun.errors import RunnerError

    bundle = open_bundle(trained_run / "bundle")
    cuda = FakeCuda()
    trt = make_fake_trt("8.2.1.8", cuda=cuda)
    engine = str(tmp_path / "e.engine")
    build_engine(bundle, BuildSpec(precision="fp16", output=engine, gpu=NANO), trt=trt, cuda=cuda, log=lambda m: None)
    errors = []

    def activate():  # another thread: pycuda's primary context is current only where it was made
        try:
            TrtRunner(engine, bundle=bundle, trt=trt, cuda=cuda, gpu=NANO).activate()
        except RunnerError as exc:
            errors.append(str(exc))

    worker = threading.Thread(target=activate)
    worker.start()
    worker.join()
    assert errors and "no CUDA context is current on this thread" in errors[0]


def test_the_cuda_contexts_own_memory_is_in_a_jetsons_device_figure(trained_run, tmp_path, monkeypatch):
    import edgerun.runtime.trt as trt_module

    available = iter([3000.0, 2790.0])  # MemAvailable before and after the context was made
    rss = iter([100.0, 110.0])  # of which 10 MB were this process's own host memory
    mb = trt_module.measure_context(lambda: None, True, lambda: next(available), lambda: next(rss))
    assert mb == pytest.approx(200.0)
    assert trt_module.measure_context(lambda: None, False) is None  # a discrete GPU's context is on the card
    monkeypatch.setitem(trt_module.CUDA_CONTEXT, "mb", 200.0)
    monkeypatch.setattr("edgerun.device.nvmap_memory", lambda: None)
    bundle = open_bundle(trained_run / "bundle")
    cuda = FakeCuda()
    trt = make_fake_trt("10.3.0", cuda=cuda)
    engine = str(tmp_path / "e.engine")
    build_engine(bundle, BuildSpec(precision="fp16", output=engine, gpu=ORIN), trt=trt, cuda=cuda, log=lambda m: None)
    with TrtRunner(engine, bundle=bundle, trt=trt, cuda=cuda, gpu=dict(ORIN, integrated=True)) as runner:
        memory = runner.device_memory()
    assert memory["mb"] >= 200.0 and "plus the CUDA context's own 200 MB" in memory["method"]
