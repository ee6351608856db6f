"""gptcourse: the small PyTorch library behind the executable GPT course.

The models and ideas, one flat module each, in the order of the book:

  Part I. From RNNs to attention (chapters 1-2)
    rnn          seq2seq RNNs: encoder, fixed-context and Bahdanau decoders, translate
    attention    scaled dot-product, masks, multi-head, additive (Bahdanau), the KV cache
  Part II. The Transformer (chapters 3-8)
    positional   sinusoidal and learned position codes
    transformer  encoder and decoder layers (post- or pre-norm), the encoder-decoder model
  Part III. GPT (chapters 9-13)
    data         the offline corpus, train/val split, batches
    tokenizers   characters and byte-level BPE (and a real model's vocabulary)
    gpt          GPTConfig (GPT-2 / GPT-3 presets), count_params, GPT with a KV cache
    bert         the encoder-only sibling, for chapter 9's comparison
    sampling     greedy, temperature, top-k, top-p, beam search: the one decoding loop
  Part IV. Using GPT (chapters 14-19)
    llama        the Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention)
    gguf         reading a real model (SmolLM2) from its GGUF file into `llama`
    cpu_decode   one token of `llama` on the CPU, written against numpy: memory speed
    chat         chat transcripts (the course's format and ChatML), reply, the course model
    batching     continuous batching: the ragged KV cache and step, the prefix cache (chapter 17)
    tools        tool calling: the tool loop, for a small GPT and for a chat model
    calculator   the safe tool (never eval), the call syntax and its parser
    tool_task    chapter 18's arithmetic questions and the small tool-calling GPT
    sft          supervised fine-tuning: transcripts with an answer mask, the masked loss
    dpo          direct preference optimisation: answers' log-probabilities, the DPO loss
    lora         low-rank adaptation: LoRALinear beside a frozen weight, add_lora, merge_lora
  Shared by every part
    train        one training loop: device pick, seeding, AdamW, progress bar
    viz          the figures the chapters share
    distributed  the same loop on many processes: torchrun, DDP, checkpoint and resume

The machinery beside them, as packages:

  serve/       an OpenAI-compatible chat server (python -m gptcourse.serve):
               protocol (the request and response schema), app (FastAPI front end),
               server (uvicorn), prompt (a request prepared for the model), params
               (sampling parameters), engine (the scheduler), runner (the batched model
               step), output (text, stops, logprobs, tool calls), cli
  grading/     the graded exercises (check() for students; python -m gptcourse.grading
               for instructors): judge and monitor (check()), exercises/ (the graded
               functions, references, cases, hints), batch (a folder of notebooks),
               cleanroom (what of a notebook runs), worker (runs it, in the sandbox),
               sandbox (bubblewrap, seccomp), cgroups (memory, tasks, CPU), gradescope
               and bundle (Gradescope and LMS export)
  exercises    a re-export of grading.exercises
"""
__version__ = "0.1.0"
