"""gptcourse: the small PyTorch library behind the executable GPT course.

One module per idea:
    attention    scaled dot-product, masks, multi-head, additive (Bahdanau)
    positional   sinusoidal and learned position codes
    tokenizers   characters and byte-level BPE
    data         the offline corpus, train/val split, batches
    gpt          GPTConfig (GPT-2 / GPT-3 presets), count_params, GPT with a KV cache
    sampling     greedy, temperature, top-k, top-p
    train        one training loop, device pick, seeding
    viz          attention heatmaps and loss curves
"""
__version__ = "0.1.0"
