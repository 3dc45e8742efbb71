"""What training and evaluation both need, below both (they never import each other): the LoRA file contract (file
names, sha256, merging an adapter into the base's weights), device choice, the compile policy, the errors a user
can act on, and the fault points of the fault-injection tests."""
