"""The `import` pass: any checkpoint into a verified, manifest-carrying directory."""
