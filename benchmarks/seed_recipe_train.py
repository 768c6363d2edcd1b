"""The original design's recipe as plain TRL: the training part of ../shared/bench/seed_recipe.py.

Copied so that the benchmark travels with the repository (the shared folder does not reach the GPU
machine). make_processor, model_config, synth and the trainer settings below are verbatim; only
the part of main() that trains is wrapped in run_recipe() (argparse values become arguments, the
model folder is the one bench.py built, the result dict also returns per-step times, and a
callback list can be added for profiling). Inference is not copied: bench.py measures vlmdet's
own detection path instead.

Recipe: 4-bit nf4 + double quant, bf16 compute; LoRA r=64, alpha 16, dropout 0.1 on q/k/v/o_proj;
SFTTrainer, per-device batch 2 x accumulation 8, gradient checkpointing, lr 1e-5 cosine, bf16.
"""
import os, time, random, tempfile
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
import transformers
from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen2Tokenizer, BitsAndBytesConfig)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
            "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type']=='image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_processor(max_pixels):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["system user assistant Detect the nutrition table in this image. table (0123,456),(789,1000) 0123456789"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    ip = Qwen2VLImageProcessor(min_pixels=256 * 28 * 28, max_pixels=max_pixels)
    return Qwen2VLProcessor(image_processor=ip, tokenizer=fast, video_processor=Qwen2VLVideoProcessor(), chat_template=TEMPLATE)


def model_config(proc, tiny):
    ids = {k: proc.tokenizer.convert_tokens_to_ids(t) for k, t in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    if tiny:
        text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)
    else:  # Qwen2-VL-7B-Instruct published config
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
        vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def synth(n, w, h, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (w, h), (rng.randint(150, 255),) * 3)
        d = ImageDraw.Draw(img)
        x1, y1 = rng.randint(0, w // 2), rng.randint(0, h // 2)
        x2, y2 = x1 + rng.randint(w // 8, w // 2), y1 + rng.randint(h // 8, h // 2)
        d.rectangle([x1, y1, x2, y2], fill="white", outline="black", width=3)
        b = [round(x1 / w * 1000), round(y1 / h * 1000), round(x2 / w * 1000), round(y2 / h * 1000)]
        ans = f"<|object_ref_start|>nutrition table<|object_ref_end|><|box_start|>({b[0]},{b[1]}),({b[2]},{b[3]})<|box_end|>"
        rows.append({"images": [img], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect the nutrition table in this image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": ans}]}]})
    return rows


def run_recipe(path, steps, dev, bs=2, quant="nf4", no_gc=False, tiny=False, callbacks=()):
    """Train the recipe for steps+1 optimizer steps on the model saved at `path` (made with
    make_processor + model_config); the first step is the warm-up and is left out of the median."""
    res = {"transformers": transformers.__version__}
    W, H = (1024, 768) if not tiny else (224, 168)
    proc = make_processor(max_pixels=1024 * 28 * 28)  # in memory, as the original (slow image processor)
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from datasets import Dataset
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.bfloat16) if (quant == "nf4" and dev == "cuda") else None
    t = time.time()
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, quantization_config=bnb,
                                                            device_map={"": 0} if dev == "cuda" else None)
    res["load_s"] = round(time.time() - t, 1)
    peft_config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    n = 16 * (steps + 1)
    ds = Dataset.from_list(synth(n, W, H))
    args = SFTConfig(output_dir=os.path.join(tempfile.gettempdir(), "sft"), per_device_train_batch_size=bs, gradient_accumulation_steps=16 // bs,
                     gradient_checkpointing=not no_gc, learning_rate=1e-5, lr_scheduler_type="cosine", max_steps=steps + 1,
                     warmup_steps=0, bf16=(dev == "cuda"), max_length=None, logging_steps=1, report_to="none",
                     save_strategy="no", dataloader_num_workers=0, use_cpu=(dev == "cpu"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=proc, peft_config=peft_config)
    batch = trainer.data_collator([ds[0], ds[1]])
    res.update(quant=quant, bs=bs, gc=not no_gc)
    res["tokens_per_sample"] = int(batch["input_ids"].shape[1])
    step_times = []
    class T(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kw): self.t = time.time()
        def on_step_end(self, *args, **kw):
            if dev == "cuda": torch.cuda.synchronize()
            step_times.append(time.time() - self.t)
    trainer.add_callback(T())
    for cb in callbacks:
        trainer.add_callback(cb)
    if dev == "cuda": torch.cuda.reset_peak_memory_stats()
    trainer.train()
    st = sorted(step_times[1:])  # drop first (warm-up)
    med = st[len(st) // 2]
    res.update(step_s_median=round(med, 3), samples_per_s=round(16 / med, 2), tokens_per_s=round(16 * res["tokens_per_sample"] / med),
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
               losses=[round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h],
               step_s=[round(s, 3) for s in step_times])
    if dev == "cuda":
        res["train_peak_alloc_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["train_peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return res
