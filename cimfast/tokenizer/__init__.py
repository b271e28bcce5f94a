"""The dVAE image tokenizer: its architecture, safe loading of DALL-E and
safetensors files, and the losses that train one."""
