"""Serving: an OpenAI-compatible chat-completions server with batching and a chat page.

- requests.py: the request's JSON -> messages, images and sampling settings, with OpenAI's errors;
- engine.py: the model's worker: a bounded queue, requests joining the running batch at step boundaries;
- batch.py: the running batch: rows that share decode steps over one KV cache, joining and leaving;
- app.py: the Starlette app (/v1/chat/completions, /v1/models, /health, the page at /);
- page.html: the chat page; cli.py: python -m minivlm serve.
The HTTP stack (starlette, uvicorn) is the `serve` extra; nothing here imports it but app.py and cli.py.
"""
