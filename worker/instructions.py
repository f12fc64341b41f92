"""The instruction text the model reads for each task of a job request.

Wording follows Google's Gemma audio examples (speech recognition and speech translation
prompts); a ``prompt`` task passes the user's own instruction through unchanged.
"""

from __future__ import annotations

from producer.schema import JobRequest

TRANSCRIBE = "Transcribe the following speech segment in its original language. Only output the transcription."
TRANSCRIBE_IN = ("Transcribe the following speech segment in {language} into {language} text. "
                 "Only output the transcription.")
TRANSLATE = "Translate the following speech segment into {target}. Only output the translation."
TRANSLATE_FROM = "Translate the following speech segment in {language} into {target}. Only output the translation."


def instruction_for(request: JobRequest) -> str:
    if request.task == "prompt":
        return request.prompt or ""
    if request.task == "translate":
        template = TRANSLATE_FROM if request.language else TRANSLATE
        return template.format(language=request.language, target=request.target_language)
    return TRANSCRIBE_IN.format(language=request.language) if request.language else TRANSCRIBE
