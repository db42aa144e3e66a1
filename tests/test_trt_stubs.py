"""The TensorRT 10.x fake, and through it the 10.x code path of edgerun.runtime.trt, held to NVIDIA's published API:
the type stubs of TensorRT 10.13 and 10.8, the oldest published (PyPI ``tensorrt-stubs``, installed --no-deps by
scripts/setup_env.sh; no stubs exist for 10.3).

Whatever the 10.x code path calls on TensorRT must exist on the fake (or the other tests fail); here every
member of the fake must exist in the stubs with compatible parameters, every enum member it offers must be a
real one, and every value it returned during a full build + inference must have the stub's return type.
"""

import ast
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_tensorrt import FakeCuda, _EnumMember, make_fake_trt

from edgerun.bundle.bundle import open_bundle
from edgerun.preprocess import preprocess
from edgerun.runtime.trt_build import BuildSpec, build_engine
from edgerun.runtime.trt_run import TrtRunner

# pybind11 returns None for a null pointer: TensorRT documents None for these on failure (not in the stubs)
NULLABLE = {
    ("Builder", "build_serialized_network"),
    ("Runtime", "deserialize_cuda_engine"),
    ("ICudaEngine", "create_execution_context"),
}
# what a fake may return for a stub's return type
STANDS_FOR = {
    "IHostMemory": (bytes,),
    "Dims": (list, tuple),
    "tuple": (tuple,),
    "int": (int,),
    "bool": (bool,),
    "str": (str,),
    "None": (type(None),),
    "ITimingCache": (object,),
}


# the oldest stubs on PyPI are 10.8's (none exist for 10.3, JetPack 6's TensorRT): the fake's 10.x surface is held to
# the oldest and the newest published, installed by scripts/setup_env.sh
STUB_VERSIONS = ("10.13", "10.8")


def _stub_file(version: str = "10.13") -> Path:
    if version != "10.13":
        path = Path(sys.prefix) / f"trt-stubs-{version}" / "tensorrt_bindings" / "tensorrt.pyi"
        if not path.is_file():
            pytest.fail(
                f"{path} is missing: pip install --no-deps --target {path.parent.parent} "
                f"tensorrt-stubs=={version}.* (scripts/setup_env.sh does)"
            )
        return path
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs (scripts/setup_env.sh does)")
    return Path(list(spec.submodule_search_locations)[0]) / "tensorrt.pyi"


def _parse(text: str) -> ast.Module:
    """ast of a generated stub; the generator writes some signatures Python rejects (a parameter without a
    default after defaulted ones): those lines lose their defaults, which this test does not read."""
    lines = text.splitlines()
    for _ in range(200):
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as exc:
            i = exc.lineno - 1
            fixed = re.sub(r"\s*=\s*(None|\.\.\.|[-\w.]+|'[^']*'|\"[^\"]*\")(?=\s*[,)])", "", lines[i])
            fixed = re.sub(
                r"([(,]\s*)(in|from|is|lambda|class|def|for|if|else|with|as|return|import|not|and|or|"
                r"global|pass|del|try|while|raise|assert)(\s*:)",
                r"\1\2_\3",
                fixed,
            )  # keyword names
            if fixed == lines[i]:
                raise
            lines[i] = fixed
    raise AssertionError("the stub file has too many unparsable lines")


def _surface(version: str = "10.13"):
    """{class name: {member: [(parameter names, return annotation)] or 'attr'}} from the stub file."""
    classes = {}

    def visit(node, prefix=""):
        members = classes.setdefault(prefix + node.name, {})
        for item in node.body:
            if isinstance(item, ast.FunctionDef):
                params = [a.arg for a in item.args.args[1:]] + [a.arg for a in item.args.kwonlyargs]
                returns = ast.unparse(item.returns) if item.returns is not None else "None"
                is_property = any(ast.unparse(d) == "property" for d in item.decorator_list)
                entry = members.setdefault(item.name, [])
                entry.append(("property" if is_property else params, returns))
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                members.setdefault(item.target.id, []).append(("attr", ast.unparse(item.annotation)))
            elif isinstance(item, ast.ClassDef):
                members.setdefault(item.name, []).append(("class", item.name))
                visit(item, prefix + node.name + ".")

    tree = _parse(_stub_file(version).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            visit(node)
    module_names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    init = _stub_file(version).parent.parent / "tensorrt" / "__init__.pyi"
    for node in _parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            module_names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            module_names.update(t.id for t in targets if isinstance(t, ast.Name))
    return classes, module_names


@pytest.fixture(scope="module", params=STUB_VERSIONS)
def stubs(request):
    return _surface(request.param)


def _fake_classes(trt):
    return [trt.Builder, trt.OnnxParser, trt.Runtime, trt.ILogger, trt.IInt8EntropyCalibrator2, *trt.classes.values()]


def test_every_fake_member_exists_in_the_stubs_with_compatible_parameters(stubs):
    classes, module_names = stubs
    trt = make_fake_trt("10.3.0")
    public = [n for n in vars(trt) if not n.startswith("_") and n not in ("calls", "state", "classes")]
    assert set(public) <= module_names, f"not in TensorRT 10's module: {sorted(set(public) - module_names)}"
    assert "__version__" in module_names
    for cls in _fake_classes(trt):
        stub = classes[cls._stub]
        for name, value in vars(cls).items():
            if name.startswith("_"):
                continue
            assert name in stub, f"{cls._stub}.{name} is not TensorRT 10 API"
            kinds = [k for k, _ in stub[name]]
            if isinstance(value, type):
                assert "class" in kinds, f"{cls._stub}.{name} is a class in the fake only"
                continue
            if isinstance(value, property) or not callable(value):
                assert "property" in kinds or "attr" in kinds or "class" in kinds, f"{cls._stub}.{name}: {kinds}"
                continue
            params = list(inspect.signature(value).parameters)[1:]
            required = [
                p
                for p, v in list(inspect.signature(value).parameters.items())[1:]
                if v.default is inspect.Parameter.empty
            ]
            fits = [k for k in kinds if isinstance(k, list) and all(p in k for p in params) and len(required) <= len(k)]
            assert fits, f"{cls._stub}.{name}{tuple(params)} matches no stub overload {kinds}"


def test_every_enum_member_of_the_fake_is_real(stubs):
    classes, _ = stubs
    trt = make_fake_trt("10.3.0")
    for enum in (
        "DataType",
        "TensorIOMode",
        "MemoryPoolType",
        "BuilderFlag",
        "NetworkDefinitionCreationFlag",
        "DeviceType",
    ):
        members = [n for n in vars(getattr(trt, enum))]
        assert members and set(members) <= set(classes[enum]), f"{enum}: {set(members) - set(classes[enum])}"
    severity = [n for n in vars(trt.ILogger.Severity) if not n.startswith("_")]
    assert set(severity) <= set(classes["ILogger.Severity"])


def test_values_returned_on_the_10x_path_have_the_stub_types(stubs, trained_run, tmp_path):
    classes, _ = stubs
    cuda = FakeCuda()
    trt = make_fake_trt("10.3.0", cuda=cuda)
    seen = []

    def recording(stub_class, name, fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            seen.append((stub_class, name, result))
            return result

        return wrapper

    for cls in _fake_classes(trt):
        for name, value in list(vars(cls).items()):
            if name.startswith("_"):
                continue
            if isinstance(value, property):
                setattr(cls, name, property(recording(cls._stub, name, value.fget), value.fset))
            elif callable(value) and not isinstance(value, type):
                setattr(cls, name, recording(cls._stub, name, value))
    bundle = open_bundle(trained_run / "bundle")
    engine = str(tmp_path / "e.engine")
    build_engine(
        bundle,
        BuildSpec(precision="fp16", output=engine, timing_cache=str(tmp_path / "tc")),
        trt=trt,
        cuda=cuda,
        log=lambda m: None,
    )
    images, _ = bundle.validation()
    with TrtRunner(engine, bundle=bundle, trt=trt, cuda=cuda) as runner:
        runner.infer({"input": preprocess(images[:1], bundle.manifest.preprocess)})
    checked = set()
    for stub_class, name, result in seen:
        returns = {r for _, r in classes[stub_class][name]}
        if result is None and (stub_class, name) in NULLABLE:
            continue
        ok = False
        for annotation in returns:
            short = annotation.rsplit(".", 1)[-1]
            if isinstance(result, _EnumMember):
                ok |= result._owner == short
            elif hasattr(type(result), "_stub"):
                ok |= type(result)._stub == short
            else:
                ok |= isinstance(result, STANDS_FOR.get(short, ()))
        assert ok, f"{stub_class}.{name} returned {type(result).__name__}, TensorRT 10 returns {returns}"
        checked.add((stub_class, name))
    for must in [
        ("IExecutionContext", "set_input_shape"),
        ("IExecutionContext", "execute_async_v3"),
        ("IExecutionContext", "set_tensor_address"),
        ("ICudaEngine", "get_tensor_mode"),
        ("ICudaEngine", "get_tensor_dtype"),
        ("Builder", "build_serialized_network"),
    ]:
        assert must in checked, f"the 10.x path never called {must}"
    assert np.dtype("float32")  # the engine's FLOAT tensors went through edgerun's own dtype table
