"""See what a network learned: Grad-CAM, saliency, feature maps, filters, activation
maximization, attention rollout, dead units, receptive fields and linear probes.

`gradients` is the one backend-specific module (TensorFlow, JAX, torch); `graph` finds
and cuts layers of a functional model; the methods are backend-free `keras.ops` code.
"""
