"""gptcourse: the small PyTorch library behind the executable GPT course.

One module per idea:
    attention    scaled dot-product, masks, multi-head, additive (Bahdanau)
    positional   sinusoidal and learned position codes
    tokenizers   characters and byte-level BPE
    data         the offline corpus, train/val split, batches
    gpt          GPTConfig (GPT-2 / GPT-3 presets), count_params, GPT with a KV cache
    sampling     greedy, temperature, top-k, top-p
    train        one training loop, device pick, seeding
    distributed  the same loop on many processes: torchrun, DDP, checkpoint and resume
    chat         the chat transcript format, context-window fitting, the course model
    serve        an OpenAI-compatible chat API on FastAPI + uvicorn (python -m gptcourse.serve)
    batching     continuous batching: many sequences decoded in one forward pass per step
    tools        tool calling: a call syntax, its parser, safe tools, the tool loop
    viz          attention heatmaps and loss curves
"""
__version__ = "0.1.0"
