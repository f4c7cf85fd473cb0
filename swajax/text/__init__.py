"""Text in and out of token ids, shared by every wing: tokenizers
(`tokenizers`: bytes, or a Hugging Face tokenizer.json) and chat templates
(`chat`: chat / ShareGPT / Alpaca records and the template rendered as
transformers renders it).

A base module of `swajax`: imports no other wing."""
