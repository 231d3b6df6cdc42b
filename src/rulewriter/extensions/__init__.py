"""Extensions beside the edit step: a new class (Chapter 4) and the inverse direction (Chapter 3)."""
