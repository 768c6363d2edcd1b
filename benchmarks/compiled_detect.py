"""Issue 20's detection levers under measurement, not yet the library's: decode steps compiled by transformers
(CompiledDetector), and the image processor run on the GPU (GpuPrepDetector).

`generate(cache_implementation="static")` preallocates the KV cache, and on CUDA transformers then runs
every decode step (not the prefill) through `torch.compile` with its default CompileConfig (inductor,
"reduce-overhead": CUDA graphs), so a step is one graph launch instead of ~28 layers x dozens of kernels
launched from Python. The library's score hooks (ChosenTokenLogProbs: a forward hook on the LM head, a
pre-hook on the model) would run inside the compiled call, where CUDA graphs reuse their output buffers;
here the same numbers come from a logits processor that runs in generate's own loop on the float copy of
the raw last-position logits (GREEDY enables no other processor, so it sees them unprocessed).
Everything else (prompt, batching, parsing, scores) is the library's Detector. bench.py's `compiled@B`
rows measure it against `thread@B` (answers and scores compared).
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vlmdet.prediction.predict import GREEDY, ChosenTokenLogProbs, Detector


class ChosenLogProbs(ChosenTokenLogProbs, LogitsProcessor):
    """ChosenTokenLogProbs fed by generate's loop instead of hooks: the same bookkeeping (the previous step's
    log-softmax, gathered at the token chosen from it) and the same finish()."""

    def __init__(self):
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self.handles = []  # no hooks to remove

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._inputs(None, (), {"input_ids": input_ids})  # keeps the previous step's chosen token's log-prob
        self._logits(None, (), scores.unsqueeze(1))  # this step's log-softmax ([batch, 1, vocab] as the head's)
        return scores


class CompiledDetector(Detector):
    def _generate(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.processor.tokenizer
        chosen = ChosenLogProbs()
        sequences = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **GREEDY,
                                        pad_token_id=tok.pad_token_id, eos_token_id=sorted(self.stop_ids),
                                        cache_implementation="static", logits_processor=LogitsProcessorList([chosen]))
        return sequences, chosen.finish(sequences).cpu()


class _OnDevice:
    """A processor whose calls make their tensors on `device` (transformers' torchvision-based image processors
    take `device=`); everything else is the wrapped processor's."""

    def __init__(self, processor, device):
        self._processor, self._device = processor, device

    def __call__(self, *args, **kwargs):
        return self._processor(*args, device=self._device, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


class GpuPrepDetector(Detector):
    """The library's Detector, its inputs() unchanged, with the processor's image work (resize, rescale,
    normalise, patches) on the model's device. detect_all still prepares the next batch in its thread, which now
    queues a few GPU kernels instead of ~30 ms an image of CPU work. The resize then runs in CUDA arithmetic, so
    pixel values may differ from the CPU's in the last bit: bench.py's `gpuprep@B` rows count whether that
    changes any answer."""

    def __init__(self, model, processor, *args, **kwargs):
        super().__init__(model, _OnDevice(processor, model.device), *args, **kwargs)
