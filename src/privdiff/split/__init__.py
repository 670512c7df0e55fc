"""Split-learning ControlNet (spec: split-controlnet.md): clients keep images, conditions and prompts;
a server trains the ControlNet. Transport-agnostic roles and messages; in-process and Flower transports.

Light on purpose: importing `privdiff.split` pulls in no torch, so that a Flower ClientApp shim
that forwards to a resident worker starts in about a second.
"""
