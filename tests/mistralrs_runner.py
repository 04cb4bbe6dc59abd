"""Run an X-LoRA export in mistral.rs and print greedy tokens with their log-probs as JSON (one line).

Run by tests/test_mistralrs_interop.py with the Python of a venv that has ``mistralrs`` (it needs nothing else):
``python mistralrs_runner.py '{"folder": ..., "base": ..., "arch": "Mistral", "prompts": [...], "max_tokens": 3}'``;
an optional ``"jinja"`` names a chat-template file for a base that has none (the demo's), so the folders load as
they are.
Prints ``{"version": ..., "results": [{"prompt": ..., "tokens": [...], "logprobs": [...]} or {"error": ...}]}``.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version


def main() -> None:
    args = json.loads(sys.argv[1])
    from mistralrs import Architecture, ChatCompletionRequest, ModelDType, Runner, Which

    which = Which.XLora(
        xlora_model_id=args["folder"],
        order=os.path.join(args["folder"], "ordering.json"),
        model_id=args["base"],
        arch=getattr(Architecture, args["arch"]) if args.get("arch") else None,
        dtype=ModelDType.F32,
    )
    options = {"jinja_explicit": args["jinja"]} if args.get("jinja") else {}
    runner = Runner(which=which, token_source="none", max_seqs=1, prefix_cache_n=0, **options)
    results = []
    for prompt in args["prompts"]:
        request = ChatCompletionRequest(
            messages=[{"role": "user", "content": prompt}],  # the template writes the content only
            model="xlora",
            max_tokens=args["max_tokens"],
            temperature=0.0,
            logprobs=True,
            top_logprobs=1,
        )
        try:
            choice = runner.send_chat_completion_request(request).choices[0]
        except Exception as err:  # an upstream failure is a result to report, not a crash of the runner
            results.append({"prompt": prompt, "error": f"{type(err).__name__}: {err}"})
            continue
        content = choice.logprobs.content if choice.logprobs is not None else None
        results.append(
            {
                "prompt": prompt,
                "text": choice.message.content,
                "tokens": [c.top_logprobs[0].token for c in content] if content else None,
                "logprobs": [c.logprob for c in content] if content else None,
            }
        )
    print(json.dumps({"version": version("mistralrs"), "results": results}))


if __name__ == "__main__":
    main()
