"""The text the model reads for each task, and what its replies mean.

Transcription and translation use the wording Google publishes for Gemma 4's audio tasks
(model card, "Audio" section; see docs/design.md "Long audio"), once per chunk. A
translation reply holds the transcript, a newline, ``{target}: `` and the translation;
``split_translation`` separates the two so a result never carries the raw two-part reply.
A ``prompt`` task passes the user's question through; over audio longer than one chunk it
is asked in one text-only turn over the timestamped transcript (``answer_instruction``).
"""

from __future__ import annotations

from producer.schema import JobRequest

ASR = ("Transcribe the following speech segment in {language} into {language} text.\n\n"
       "Follow these specific instructions for formatting the answer:\n"
       "* Only output the transcription, with no newlines.\n"
       "* When transcribing numbers, write the digits, i.e. write 1.7 and not one point seven, "
       "and write 3 instead of three.")
ASR_ANY_LANGUAGE = ASR.replace("in {language} into {language} text.", "in its original language.")
AST = ("Transcribe the following speech segment in {source}, then translate it into {target}.\n"
       "When formatting the answer, first output the transcription in {source}, then one newline, "
       "then output the string '{target}: ', then the translation in {target}.")
ANSWER = ("Here is the transcript of a recording, one line per part, each with its start and end time "
          "(hours:minutes:seconds):\n\n{transcript}\n\n"
          "Answer the following about the recording, naming the times where it helps:\n{question}")


def transcribe_instruction(language: str | None) -> str:
    return ASR.format(language=language) if language else ASR_ANY_LANGUAGE


def instruction_for(request: JobRequest) -> str:
    """The instruction for one chunk of ``request``'s audio (for ``prompt``: audio within one chunk)."""
    if request.task == "prompt":
        return request.prompt or ""
    if request.task == "translate":
        source = request.language or "its original language"
        return AST.format(source=source, target=request.target_language)
    return transcribe_instruction(request.language)


def split_translation(reply: str, target: str) -> tuple[str, str]:
    """(transcript, translation) of an AST reply; a reply without its marker is all translation."""
    transcript, newline, rest = reply.partition("\n")
    if not newline:
        return "", reply.strip()
    marker = f"{target}:"
    rest = rest.strip()
    return transcript.strip(), rest[len(marker):].strip() if rest.startswith(marker) else rest


def answer_instruction(question: str, transcript_lines: list[str]) -> str:
    return ANSWER.format(transcript="\n".join(transcript_lines), question=question)
