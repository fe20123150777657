"""Self-contained transformers remote code for angelmed checkpoints, generated from angelmed's own sources.

`write_remote_code(dst)` writes `configuration_bailing_moe_v2.py` and `modeling_bailing_moe_v2.py`, the files that
the `auto_map` of our config.json names, so `AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True)`
works with only transformers and torch installed. They are built, not hand-copied: see `generate.py`.
`export_remote_code(model_dir, tokenizer=None)` is what `angelmed convert … --hf-remote-code` calls.
"""

from angelmed.hf_remote.export import export_remote_code, write_remote_code
from angelmed.hf_remote.generate import CONFIG_FILE, MODELING_FILE, RemoteCodeError, render_remote_code

__all__ = ["CONFIG_FILE", "MODELING_FILE", "RemoteCodeError", "export_remote_code", "render_remote_code",
           "write_remote_code"]
