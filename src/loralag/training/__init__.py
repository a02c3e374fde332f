"""Training knowledge and task adapters as PEFT LoRA folders (train) and training them with some adapters'
rows frozen in place (frozen_rows).

Imports loralag.library and loralag.errors; never generation, serving, evaluation or experiments.
"""

# A LoRA init of TrainConfig.init (train.py, activation_init.py); here, so settings are checked without torch
INITS = ("peft", "activations", "contrast", "salient")
# the inits that read a reference (TrainConfig.contrast_against): generic text unless given one
CONTRAST_INITS = ("contrast", "salient")
