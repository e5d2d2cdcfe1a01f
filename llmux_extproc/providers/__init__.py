"""Provider adapters: one module per wire format, all behind `base.Adapter`."""
