"""Drivers of whole experiments on top of the library: the paper's XOR study and the end-to-end demo."""
