"""Integrations with other libraries (HF transformers, peft). Import the submodules directly:
they pull in transformers, which the core of fastpeft does not need."""
