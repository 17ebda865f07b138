"""The node side: the Flower ClientApp and the local training it runs."""
