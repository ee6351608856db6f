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

Graded exercises and the grader:
    exercises      the graded functions, their references, cases and hints
    grading        check() for students; batch grading for instructors (python -m gptcourse.grading)
    cleanroom      the statements of a notebook a graded function needs, vetted before anything runs
    grading_worker the process that runs them, inside the sandbox
    sandbox        bubblewrap and seccomp around that process
    cgroups        its memory, task and CPU limits (cgroup v2 or v1)
    gradescope     Gradescope's autograder bundle and results.json; an LMS gradebook CSV
"""
__version__ = "0.1.0"
