"""INT8 by TensorRT's explicit-quantization rules: the rules on the exported graph, ONNX Runtime and Polygraphy on the
host, PyTorch's fake quantization against the ONNX Q/DQ model, the sensitivity order with one fragile layer, the
gate's advice."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgedistill.ship.fakequant import QuantPlan, add_fake_quant, module_for_node, remove_fake_quant, residual_modules
from edgedistill.ship.int8 import Int8Job, agreement, gate_advice, keep_sensitive, output_r2, sensitivity
from edgedistill.ship.onnx import export_onnx, ort_outputs
from edgedistill.ship.qdq import activation_ranges, insert_qdq, qdq_violations, quantizable_nodes, residual_inputs


def _digits(n=64, size=32):
    import cv2
    from conftest import digits_arrays

    images, labels = digits_arrays()
    x = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in images[:n]]).astype(np.float32)
    x = (x / 255.0 - 0.5) / 0.5
    return np.repeat(x[:, None], 3, axis=1).astype(np.float32), labels[:n]


def _exported(model: nn.Module, path: Path, size=32) -> onnx.ModelProto:
    export_onnx(model.eval(), path, (1, 3, size, size), 13, False)
    return onnx.load(str(path))


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "resnet10t"])
def test_qdq_model_keeps_tensorrts_rules_and_runs_in_onnxruntime(name, tmp_path):
    import timm

    torch.manual_seed(0)
    fp32 = _exported(timm.create_model(name, num_classes=10), tmp_path / "fp32.onnx")
    x, _ = _digits()
    amax = activation_ranges(tmp_path / "fp32.onnx", x, 1, "minmax", tmp_path)
    model = insert_qdq(fp32, amax)
    assert qdq_violations(model) == []
    onnx.checker.check_model(model)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:  # every weighted layer: a per-tensor activation Q/DQ, a per-channel weight Q/DQ
        if node.op_type in ("Conv", "Gemm"):
            act, weight = producer[node.input[0]], producer[node.input[1]]
            assert act.op_type == "DequantizeLinear" and inits[act.input[1]].size == 1, node.name
            assert weight.op_type == "DequantizeLinear", node.name
            if node.op_type == "Conv":
                assert inits[weight.input[1]].shape == (inits[producer[weight.input[0]].input[0]].shape[0],)
            if len(node.input) > 2:  # the bias stays a float constant, never dequantized
                assert node.input[2] in inits or producer[node.input[2]].op_type == "Identity"
    adds = [
        n
        for n in graph.node
        if n.op_type == "Add"
        and not any(i in inits or (i in producer and producer[i].op_type == "Identity") for i in n.input)
    ]
    assert adds and all(
        any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input) for n in adds
    ), "a residual add without a quantized input"
    onnx.save(model, str(tmp_path / "int8.onnx"))
    a, b = ort_outputs(tmp_path / "fp32.onnx", x, 1, False), ort_outputs(tmp_path / "int8.onnx", x, 1, False)
    assert agreement(a, b) >= 0.9 and np.abs(a - b).max() < 0.5 * np.abs(a).max()


def test_rule_checker_names_each_broken_rule(tmp_path):
    import timm

    fp32 = _exported(timm.create_model("resnet10t", num_classes=10), tmp_path / "fp32.onnx")
    x, _ = _digits(16)
    good = insert_qdq(fp32, activation_ranges(tmp_path / "fp32.onnx", x, 1, "minmax", tmp_path))
    inits = {t.name: t for t in good.graph.initializer}
    zero = next(n for n in good.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    inits[zero.input[2]].CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zero.input[2]))
    weight = next(n for n in good.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits)
    for attr in weight.attribute:
        if attr.name == "axis":
            attr.i = 1
    unsigned = next(
        n
        for n in good.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_in_q") and n.input[2] != zero.input[2]
    )
    inits[unsigned.input[2]].CopyFrom(numpy_helper.from_array(np.array(0, dtype=np.uint8), unsigned.input[2]))
    problems = "\n".join(qdq_violations(good))
    assert f"'{zero.name}': zero point [3]" in problems
    assert f"'{weight.name}': per-channel weight scales must run along axis 0" in problems
    assert f"'{unsigned.name}': zero point of type uint8" in problems


def test_polygraphy_runs_the_int8_model_and_agrees_with_fp32_on_real_images(tmp_path):
    pytest.importorskip("polygraphy")
    import timm
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    torch.manual_seed(0)
    fp32 = _exported(timm.create_model("lcnet_050", num_classes=10), tmp_path / "fp32.onnx")
    x, _ = _digits(32)
    onnx.save(
        insert_qdq(fp32, activation_ranges(tmp_path / "fp32.onnx", x, 1, "minmax", tmp_path)),
        str(tmp_path / "int8.onnx"),
    )
    runners = [OnnxrtRunner(SessionFromOnnx(str(tmp_path / f), providers=["cpu"])) for f in ("fp32.onnx", "int8.onnx")]
    results = Comparator.run(runners, data_loader=[{"input": x[i : i + 1]} for i in range(len(x))])
    fp32_out, int8_out = (results[r.name] for r in runners)
    assert len(fp32_out) == len(int8_out) == len(x)
    agree = np.mean([np.argmax(a["logits"]) == np.argmax(b["logits"]) for a, b in zip(fp32_out, int8_out)])
    assert agree >= 0.9  # the top-1 class of most real images survives INT8


@pytest.mark.parametrize("name", ["lcnet_050", "mobilenetv2_050", "tf_efficientnet_lite0"])
def test_pytorch_fake_quant_agrees_with_the_onnx_qdq_model_on_held_out_images(tmp_path, name):
    """What QAD trains (fake quantization in PyTorch, BatchNorm unfolded) is what the exported Q/DQ model computes
    (BatchNorm folded into the weights, per-channel scales), up to rounding ties: the layers' inputs and weights,
    the residual Adds' quantized inputs (MobileNetV2, EfficientNet-Lite) and TensorFlow's "same" padding (the
    tf_* models pad inside their strided convolutions)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():  # realistic BatchNorm statistics, so folding them matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    fp32 = _exported(model, tmp_path / "fp32.onnx")
    calib, _ = _digits(48)
    held_out, _ = _digits(200)
    held_out = held_out[48:]
    amax = activation_ranges(tmp_path / "fp32.onnx", calib, 1, "minmax", tmp_path)
    onnx.save(insert_qdq(fp32, amax), str(tmp_path / "int8.onnx"))
    by_module = {module_for_node(n.name): amax[n.input[0]] for n in fp32.graph.node if n.op_type in ("Conv", "Gemm")}
    residuals = residual_inputs(fp32, amax)
    assert bool(residuals) == (name != "lcnet_050")  # LCNet has no residual Add
    plan = QuantPlan(by_module, residuals, tmp_path / "fp32.onnx", calib[:1])
    assert len(residual_modules(model, plan)) == len(residuals)  # every quantized residual input found in PyTorch
    fake = add_fake_quant(model, plan).eval()
    with torch.no_grad():
        torch_out = fake(torch.from_numpy(held_out)).numpy()
    ort_out = ort_outputs(tmp_path / "int8.onnx", held_out, 1, False)
    fp32_out = ort_outputs(tmp_path / "fp32.onnx", held_out, 1, False)
    scale = np.abs(ort_out).max()
    assert agreement(torch_out, ort_out) >= 0.98
    # rounding ties flip where folded and unfolded BatchNorm differ in the last float bit, and deeper networks
    # carry more of them: the emulation stays within 3% of the output scale on average, and never further from
    # the INT8 model than the FP32 model is (a dropped padding or a missed quantizer is far beyond both)
    assert np.abs(torch_out - ort_out).mean() < 0.03 * scale
    assert np.abs(torch_out - ort_out).max() < max(0.05 * scale, 1.5 * np.abs(fp32_out - ort_out).max())
    # before any fine-tuning, what QAD starts from is the FP32 model up to INT8 rounding (same classes, close values)
    assert agreement(torch_out, fp32_out) >= 0.9 and np.abs(torch_out - fp32_out).mean() < 0.05 * scale
    with torch.no_grad():  # and the float model inside is the original one again
        assert torch.equal(
            remove_fake_quant(fake)(torch.from_numpy(held_out[:4])), model(torch.from_numpy(held_out[:4]))
        )
    assert list(remove_fake_quant(fake).state_dict()) == list(model.state_dict())


def _probe(model: nn.Module, calib: np.ndarray, tmp_path: Path):
    """A 16 px model exported, its MinMax ranges, a runner of any ONNX variant on ``calib``, FP32's outputs."""
    fp32 = _exported(model, tmp_path / "fp32.onnx", size=16)
    amax = activation_ranges(tmp_path / "fp32.onnx", calib, 1, "minmax", tmp_path)

    def run(variant: onnx.ModelProto) -> np.ndarray:
        onnx.save(variant, str(tmp_path / "probe.onnx"))
        return ort_outputs(tmp_path / "probe.onnx", calib, 1, False)

    return fp32, amax, run, ort_outputs(tmp_path / "fp32.onnx", calib, 1, False)


class _Fragile(nn.Module):
    """Four convolutions; before the third, one pixel of one channel spikes to 1,000 on every image, so quantizing
    the third's input per tensor rounds every ordinary value to zero."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        spike = torch.zeros(1, 8, 16, 16)
        spike[0, 0, 0, 0] = 1000.0
        self.register_buffer("spike", spike)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c3(x + self.spike))
        return self.fc(torch.relu(self.c4(x)).mean((2, 3)))


def test_sensitivity_ranks_the_fragile_layer_first_and_partial_keeps_it(tmp_path):
    torch.manual_seed(0)
    calib, labels = _digits(64, size=16)
    model = _Fragile()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # a model that tells digits apart, so that agreeing with it means something
        loss = nn.functional.cross_entropy(model(torch.from_numpy(calib)), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fp32, amax, run, reference = _probe(model, calib, tmp_path)
    assert len(set(reference.argmax(1))) >= 5
    rows = sensitivity(fp32, amax, run, reference, quantizable_nodes(fp32))
    assert rows[0]["layer"] == "/c3/Conv" and rows[0]["recovered"] > 0.3
    assert all(r["recovered"] < rows[0]["recovered"] / 4 for r in rows[1:])  # by far the most sensitive
    assert [r["recovered"] for r in rows] == sorted((r["recovered"] for r in rows), reverse=True)
    kept, drop, steps = keep_sensitive(
        rows, 5, lambda k: output_r2(reference, run(insert_qdq(fp32, amax, k))), 1.0, 0.05
    )
    assert kept[0] == "/c3/Conv" and drop <= 0.05 and len(kept) <= 5
    assert steps[0]["drop"] < 1 - rows[0]["fidelity_all_int8"] - 0.3  # keeping it alone removes most of the error
    assert steps[0] == {"layer": "/c3/Conv", "drop": steps[0]["drop"], "kept": True}
    assert all(s["kept"] == (s["layer"] in kept) for s in steps) and steps[-1]["drop"] == drop


class _CrushedHead(nn.Module):
    """A defect detector whose classifier input carries one feature of 10,000 on every image (a constant the bias
    absorbs in FP32): quantized per tensor, every ordinary feature rounds to zero and the logits stop depending on
    the image, while the arg-max still says "good" for the good majority."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)
        self.register_buffer("spike", torch.zeros(1, 8))

    def add_spike(self):
        """One feature +10,000 on every image, its contribution taken off the bias: the same FP32 logits."""
        with torch.no_grad():
            self.spike[0, 0] = 10000.0
            self.fc.bias -= 10000.0 * self.fc.weight[:, 0]

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)) + self.spike)


def test_sensitivity_sees_a_crushed_classifier_that_top1_agreement_misses(tmp_path):
    torch.manual_seed(0)
    calib, digits = _digits(200, size=16)
    labels = (digits == 0).astype(np.int64)  # "defect": one image in ten
    model = _CrushedHead()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    weight = torch.tensor([1.0, 9.0])  # balanced: a detector, not a model that calls everything good
    for _ in range(300):
        loss = nn.functional.cross_entropy(model(torch.from_numpy(calib)), torch.from_numpy(labels), weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        before = model(torch.from_numpy(calib))
        model.add_spike()
        assert torch.allclose(model(torch.from_numpy(calib)), before, atol=1e-2)
    fp32, amax, run, reference = _probe(model, calib, tmp_path)
    found = reference.argmax(1) == 1
    assert found[labels == 1].mean() > 0.8 and found[labels == 0].mean() < 0.1  # it finds defects, rejects few good
    int8 = run(insert_qdq(fp32, amax))
    assert len(np.unique(int8.round(4), axis=0)) <= 3 < len(np.unique(reference.round(4), axis=0))  # image-blind
    assert agreement(reference, int8) > 0.85  # top-1 agreement barely notices
    by_agreement = sensitivity(fp32, amax, run, reference, quantizable_nodes(fp32), agreement)
    assert by_agreement[0]["recovered"] < 0.15
    rows = sensitivity(fp32, amax, run, reference, quantizable_nodes(fp32))  # R² of the logits
    assert rows[0]["fidelity_all_int8"] < 0.2
    assert rows[0]["layer"] == "/fc/Gemm" and rows[0]["fidelity_without_it"] > 0.9 and rows[0]["recovered"] > 0.7


def test_the_gate_says_what_was_tried_and_the_next_recipe_line():
    job = Int8Job(
        fp32_path=Path("m.onnx"),
        workdir=Path("."),
        calib=np.zeros(1),
        calib_batch=1,
        score=None,
        run_calib=None,
        fp32_score=0.9,
        mode="auto",
        method="minmax",
        limit=0.01,
        budget=8,
        sensitivity_images=64,
    )
    attempts = {"ptq": {"drop": 0.063, "kept_fp16": []}, "partial": {"drop": 0.021, "kept_fp16": ["a", "b", "c"]}}
    text = gate_advice({"attempts": attempts, "status": "rejected", "chosen": "partial"}, job)
    assert text.startswith("INT8 rejected: PTQ (minmax): drop 6.30 points; partial, 3 layer(s) kept in FP16: drop 2.10")
    assert text.endswith("next: --set export.int8=qad (quantization-aware distillation, against the FP32 teacher)")
    attempts["qad"] = {"drop": 0.014, "kept_fp16": [], "epochs": 2}
    text = gate_advice({"attempts": attempts, "status": "rejected", "chosen": "qad"}, job)
    assert "QAD, 2 epoch(s): drop 1.40 points" in text and "--set export.qad_epochs=4" in text
    assert "--set export.int8_keep_budget=16" in text
    ok = gate_advice(
        {"attempts": {"ptq": {"drop": 0.004, "kept_fp16": []}}, "status": "accepted", "chosen": "ptq"}, job
    )
    assert ok.startswith("INT8 ptq passes the 1.00-point gate")


def test_fidelity_is_r2_against_the_fp32_outputs():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 2))
    assert output_r2(ref, ref) == 1.0
    noisy = ref + rng.normal(scale=0.5, size=ref.shape)
    assert 0.6 < output_r2(ref, noisy) < 0.9  # about 1 - 0.25 / 1
    assert output_r2(ref, np.zeros_like(ref)) < 0.1


def test_module_names_follow_the_exporters_scopes():
    assert module_for_node("/blocks/blocks.0/blocks.0.0/se/conv_reduce/Conv") == "blocks.0.0.se.conv_reduce"
    assert module_for_node("/layer4/layer4.0/downsample/downsample.1/Conv") == "layer4.0.downsample.1"
    assert module_for_node("/conv_stem/Conv") == "conv_stem" and module_for_node("/fc/Gemm") == "fc"
