"""Drop-in nn.Modules built on fastpeft ops."""
