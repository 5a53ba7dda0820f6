"""What keeps the system learning and bounded: the continual learner, the memory manager, the adaptive retriever."""
