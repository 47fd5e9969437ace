"""Using a trained model: generation with a carried state, chat, evaluation, the loss plot."""
