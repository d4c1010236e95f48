//! Activations and loss: ReLU, sigmoid, binary cross-entropy with logits and their gradients.
