"""One router per API family; each only translates its vocabulary to and from GenerationRequest."""
