"""The durable state, behind one interface."""
