"""Built-in paperplug plugins: one module per paper, each listed under the ``paperplug``
entry-point group and discovered exactly as a third-party plugin is."""
