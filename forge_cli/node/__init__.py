"""The node: an aiohttp server selling inference, where every request is a signed trade."""
