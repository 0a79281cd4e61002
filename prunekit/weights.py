"""Weight sources: a model's tensors read one at a time by their Hugging Face names, from a GGUF
file or a safetensors folder, so that a model larger than memory can still be pruned block by block.

The skeleton of the model is built without weights (parameters on the meta device, buffers such
as rotary tables real); a module is materialized from the source only while it is worked on.
GGUF names and the per-family corrections (LLaMA's q/k row permutation, Gemma's ``w - 1`` norms)
come from transformers' own GGUF loader, one tensor at a time instead of the whole file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from prunekit.arch import architecture_for
from prunekit.errors import UserInputError


DEQUANTIZE_ROWS = 4096


class WeightSource:
    """Tensors by Hugging Face state-dict name. A tied output head is read from the embedding."""

    config = None

    def names(self):
        """Every tensor name the checkpoint holds (a set-like view)."""
        raise NotImplementedError

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _resolve(self, name: str) -> str:
        arch = architecture_for(self.config)
        if name == f"{arch.head}.weight" and name not in self.names():
            if not getattr(self.config, "tie_word_embeddings", False):
                raise UserInputError(f"the checkpoint has no {name} and its config does not tie it to the "
                                     f"embedding: pass the complete model")
            name = f"{arch.embedding}.weight"
        if name not in self.names():
            raise UserInputError(f"the checkpoint lacks {name}: pass the complete model, unmodified")
        return name

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._read(self._resolve(name)).to(dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def row_blocks(self, name: str, dtype: torch.dtype = torch.float32, rows: int = DEQUANTIZE_ROWS):
        """(first row, rows) of a 2-D tensor, a block at a time: a 150k-token embedding or head is
        1 GB in float32, and nothing that reads it row by row needs it whole."""
        name = self._resolve(name)
        total = self.shape(name)[0]
        for start in range(0, total, rows):
            yield start, self._read_rows(name, start, min(start + rows, total)).to(dtype)

    def materialize(self, module: nn.Module, prefix: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Give every parameter of ``module`` (named ``prefix``.* in the checkpoint) its weights."""
        wanted = dict(module.named_parameters())
        state = {}
        for key, meta in wanted.items():
            tensor = self.get(f"{prefix}.{key}", dtype)
            if tuple(tensor.shape) != tuple(meta.shape):
                raise UserInputError(f"{prefix}.{key} has shape {tuple(tensor.shape)} in the checkpoint, "
                                     f"{tuple(meta.shape)} in its config: pass the model unmodified")
            state[key] = tensor
        persistent = module.state_dict().keys()  # buffers saved with the module must be passed back
        state.update({k: b for k, b in module.named_buffers() if k in persistent})
        module.load_state_dict(state, strict=True, assign=True)
        return module


class GGUFWeights(WeightSource):
    """A GGUF file: gguf's reader for its layout, each tensor read with ``os.pread`` and dequantized
    when it is asked for. Not through the reader's memory map: every page of a mapped file that was
    read stays counted in the process's resident memory, the whole file by the last block."""

    def __init__(self, path: Path, config, skeleton: nn.Module):
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        self.config = config
        reader = gguf.GGUFReader(path)
        self._file = open(path, "rb")
        family = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        self._processor = TENSOR_PROCESSORS.get(family, TensorProcessor)(config=config.to_dict())
        to_hf = get_gguf_hf_weights_map(skeleton, self._processor)
        # Only the tensor table is kept: the reader's parsed metadata (a 150k-token vocabulary as
        # numpy arrays, one per string) is 400 MB of a 1.5B file's run, and the tokenizer has it.
        self._tensors = {to_hf[t.name]: t for t in reader.tensors if t.name in to_hf}

    def names(self):
        return self._tensors.keys()

    def _rows(self, tensor, start: int, stop: int):
        """Rows [start, stop) of the tensor's stored (quantized) array, read from the file."""
        import numpy as np

        layout = tensor.data  # a view of the map: its shape and strides only, no page is touched
        row_bytes = layout.strides[0]
        raw = os.pread(self._file.fileno(), (stop - start) * row_bytes, tensor.data_offset + start * row_bytes)
        return np.frombuffer(raw, dtype=layout.dtype).reshape((stop - start, *layout.shape[1:]))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[self._resolve(name)].shape))  # ggml lists columns first

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop), dequantized and corrected. The corrections are row-wise for every
        tensor read in blocks (embeddings and heads); q/k, whose rows are permuted, are read whole."""
        import gguf
        import numpy as np

        tensor = self._tensors[name]
        block = gguf.dequantize(self._rows(tensor, start, stop), tensor.tensor_type)
        processed = self._processor.process(weights=block, name=tensor.name).weights
        return torch.from_numpy(np.array(processed, dtype=np.float32))  # a copy: the read buffer is read-only

    def _read(self, name: str) -> torch.Tensor:
        import gguf
        import numpy as np

        tensor = self._tensors[name]
        rows = tensor.data.shape[0]
        values = None
        # By row blocks into one float32 buffer: dequantizing a 150k-row embedding at once makes
        # numpy temporaries several times its float32 size.
        for start in range(0, rows, DEQUANTIZE_ROWS):
            stop = min(start + DEQUANTIZE_ROWS, rows)
            block = gguf.dequantize(self._rows(tensor, start, stop), tensor.tensor_type)
            if values is None:
                values = torch.empty((rows, *block.shape[1:]), dtype=torch.float32)
            values[start:stop].numpy()[...] = block  # numpy copies from the read-only buffer
        array = values.numpy()
        processed = self._processor.process(weights=array, name=tensor.name).weights  # q/k order, norm offsets
        return values if processed is array else torch.from_numpy(np.array(processed, dtype=np.float32))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsWeights(WeightSource):
    """A Hugging Face folder: one or many (indexed) safetensors files, each tensor read with
    ``os.pread`` from the offsets in the file's header. Written here rather than with
    ``safetensors.safe_open`` because that maps the file, and the pages read stay counted in the
    process's resident memory: a 7 GB checkpoint ends as 7 GB of RSS however it is streamed."""

    def __init__(self, folder: Path, config):
        self.config = config
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise UserInputError(f"{folder} holds no .safetensors weights: pass a Hugging Face model folder")
        self._entries = {}  # name -> (file, dtype, shape, absolute start, byte count)
        for file in files:
            handle = open(folder / file, "rb")
            try:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            except (ValueError, UnicodeDecodeError):
                raise UserInputError(f"{folder / file} is not a safetensors file (corrupt or incomplete?): "
                                     f"pass the folder the model was saved to, unmodified") from None
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                self._entries[key] = (handle, _SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], 8 + size + begin,
                                      end - begin)

    def names(self):
        return self._entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[self._resolve(name)][2])

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        handle, dtype, shape, offset, count = self._entries[name]
        row_bytes = count // shape[0]
        return self._bytes(handle, dtype, [stop - start, *shape[1:]], offset + start * row_bytes,
                           (stop - start) * row_bytes, name)

    def _read(self, name: str) -> torch.Tensor:
        handle, dtype, shape, offset, count = self._entries[name]
        return self._bytes(handle, dtype, shape, offset, count, name)

    @staticmethod
    def _bytes(handle, dtype, shape, offset: int, count: int, name: str) -> torch.Tensor:
        raw = bytearray(os.pread(handle.fileno(), count, offset))
        if len(raw) != count:
            raise UserInputError(f"{handle.name} is truncated at {name}: pass the complete checkpoint")
        return torch.frombuffer(raw, dtype=dtype).reshape(shape) if count else torch.empty(shape, dtype=dtype)


class ModuleWeights(WeightSource):
    """A model already in memory, read through the same interface: a streamed export of a loaded
    model then computes each derived tensor (stacked or transposed) one at a time instead of
    holding a second copy of every projection."""

    def __init__(self, model: nn.Module):
        self.config = model.config
        self._tensors = dict(model.named_parameters(remove_duplicate=False))

    def names(self):
        return self._tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[self._resolve(name)].shape)

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name].detach()[start:stop]

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


class RoundedWeights(WeightSource):
    """``source`` with its matrices (linear and embedding weights) as ``precision`` ships them
    (prunekit.weight_rounding.round_tensor, what ``rounded_copy`` does to a model in memory): a
    streamed model judged on the weights of an artifact this machine cannot run."""

    def __init__(self, source: WeightSource, precision: str):
        self.source, self.precision, self.config = source, precision, source.config

    def names(self):
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def _rounded(self, tensor: torch.Tensor) -> torch.Tensor:
        from prunekit.weight_rounding import round_tensor

        return round_tensor(tensor, self.precision) if tensor.dim() == 2 else tensor

    def _read(self, name: str) -> torch.Tensor:
        return self._rounded(self.source._read(name))

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._rounded(self.source._read_rows(name, start, stop))


class BlendedWeights(WeightSource):
    """``pruned`` with the tensors named in ``from_dense`` read from ``dense`` instead: N:M on a
    share of a streamed model's blocks (prunekit.pruning.partial.blended_weights)."""

    def __init__(self, pruned: WeightSource, dense: WeightSource, from_dense: set[str]):
        self.pruned, self.dense, self.from_dense, self.config = pruned, dense, frozenset(from_dense), pruned.config

    def names(self):
        return self.pruned.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.pruned.shape(name)

    def _source(self, name: str) -> WeightSource:
        return self.dense if name in self.from_dense else self.pruned

    def _read(self, name: str) -> torch.Tensor:
        source = self._source(name)
        return source._read(source._resolve(name))

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        source = self._source(name)
        return source._read_rows(source._resolve(name), start, stop)


def empty_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model's modules with parameters on the meta device (no memory) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head counts once, as in a loaded model
    return model.eval()


class Float32Head(nn.Module):
    """An output head that computes in float32 from lower-precision hidden states: rounding the
    logits to bfloat16 moves a logit of 20 by up to 0.08, which would reshape every sampling
    distribution; the head is one product per step, the blocks keep their compact weights."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden.float(), self.weight)


def whole_model(config, weights: WeightSource, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The whole model read from ``weights`` with its blocks in ``dtype`` and its head in float32
    (Float32Head): for the one step of a streamed deploy that needs every block at once, the
    model writing its own calibration text, in about half the memory of float32."""
    arch = architecture_for(config)
    model = empty_model(config, dtype)
    model.set_submodule(arch.head, nn.Identity())  # the head comes from the source below, in float32
    for name, child in model.named_children():
        weights.materialize(child, name, dtype)
    model.set_submodule(arch.head, Float32Head(weights.get(f"{arch.head}.weight", torch.float32)))
    return model.eval()

