"""Turn a problem into the text the model sees: the chat template when the tokenizer has one."""

from __future__ import annotations

from deepsynapse.formats import XMLSchema, system_prompt


def build_prompt(tokenizer, question: str, schema: XMLSchema) -> str:
    """System instruction (the XML format) + the question, ready for generation."""
    system = system_prompt(schema)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\nQuestion: {question}\nAnswer:\n"
